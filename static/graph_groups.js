// The supernodes panel of the graph page (static/graph.js loads this file and draws the supernodes themselves).
//
// Merge the pinned nodes under a label; list the groups /api/v1/graphs/{slug}/supernodes suggests (nodes at nearby
// positions whose explanations match, decoders are near or that co-fire: sae_core/circuits/supernodes.py) with the
// reasons' numbers, to accept (label editable) or dismiss; rename or ungroup the accepted ones. The groups live in
// graph.js's state and the URL's #group=; built with DOM calls under the page's CSP.
window.saescopeGraphGroups = function (api) {
  "use strict";

  const state = api.state, frame = api.frame, label = api.label, draw = api.draw, writePins = api.writePins;
  const suggested = { list: [], dismissed: new Set() };

  function make(tag, props, parent) {
    const e = document.createElement(tag);
    for (const k in props) e[k] = props[k];
    if (parent) parent.appendChild(e);
    return e;
  }

  // the panel, built here so the page's template stays as it is: below the pinned list
  const panel = make("section", { className: "card graph-groups", id: "graph-groups" });
  make("strong", { textContent: "Supernodes" }, panel);
  make("span", { className: "muted small", textContent: " (drawn as one node, members hidden and their edges summed; kept in the link's #group=…)" }, panel);
  const mergeRow = make("div", { className: "group-merge" }, panel);
  const mergeLabel = make("input", { type: "text", id: "graph-group-label", placeholder: "label", maxLength: 80 }, mergeRow);
  mergeLabel.setAttribute("aria-label", "supernode label");
  const mergeButton = make("button", { type: "button", id: "graph-merge", textContent: "merge pinned into a supernode" }, mergeRow);
  const mergeNote = make("span", { className: "muted small", id: "graph-merge-note" }, mergeRow);
  const groupList = make("ul", { id: "graph-group-list", className: "pin-list" }, panel);
  const suggestHead = make("div", { className: "group-suggest-head" }, panel);
  make("strong", { textContent: "Suggested groups" }, suggestHead);
  const suggestStatus = make("span", { className: "muted small", id: "graph-suggest-status", textContent: " loading…" }, suggestHead);
  const suggestList = make("ul", { id: "graph-suggest-list", className: "pin-list" }, panel);
  const pinSection = document.getElementById("graph-pins");
  if (pinSection) pinSection.after(panel);
  else frame.after(panel);

  function addGroup(text, members) {
    const taken = new Set(members);
    // a node lives in one supernode: the new group takes it from any other, which dissolves below two members
    state.groups = state.groups.map((grp) => ({ label: grp.label, members: grp.members.filter((m) => !taken.has(m)) })).filter((grp) => grp.members.length >= 2);
    state.groups.push({ label: text, members: members.slice() });
    writePins();
    draw();
  }

  function sameSet(a, b) {
    if (a.length !== b.length) return false;
    const s = new Set(a);
    return b.every((x) => s.has(x));
  }

  mergeButton.addEventListener("click", () => {
    const members = Array.from(state.pins).filter((id) => state.byId.has(id) && ["feature", "error"].includes(state.byId.get(id).kind));
    if (members.length < 2) {
      mergeNote.textContent = " pin two or more feature nodes first (shift-click)";
      return;
    }
    const first = state.byId.get(members[0]);
    const text = mergeLabel.value.trim() || (first.explanation ? first.explanation : "group " + (state.groups.length + 1));
    for (const m of members) state.pins.delete(m);
    mergeLabel.value = "";
    mergeNote.textContent = "";
    addGroup(text, members);
  });

  function reasonText(reasons) {
    const names = { explanation: "explanations' Jaccard", decoder: "decoder cosine", cofire: "co-firing Jaccard" };
    const by = new Map();
    for (const r of reasons) {
      if (!by.has(r.kind)) by.set(r.kind, []);
      by.get(r.kind).push(r.value);
    }
    const parts = [];
    for (const [kind, values] of by) {
      const lo = Math.min(...values), hi = Math.max(...values);
      const range = lo === hi ? lo.toFixed(2) : lo.toFixed(2) + "–" + hi.toFixed(2);
      parts.push((names[kind] || kind) + " " + range + " (" + values.length + (values.length === 1 ? " pair)" : " pairs)"));
    }
    return parts.join("; ");
  }

  function renderGroups() {
    groupList.textContent = "";
    if (!state.supers.size) make("li", { className: "muted small", textContent: "none yet" }, groupList);
    for (const s of state.supers.values()) {
      const li = make("li", { className: "group" }, groupList);
      const input = make("input", { type: "text", value: s.label, maxLength: 80 }, li);
      input.setAttribute("aria-label", "rename supernode");
      input.addEventListener("change", () => {
        const grp = state.groups[Number(s.id.slice(1))];
        if (grp && input.value.trim()) grp.label = input.value.trim();
        writePins();
        draw();
      });
      make("span", { className: "muted small", textContent: " " + s.members.length + " nodes, influence " + s.influence.toPrecision(3) + " " }, li);
      const b = make("button", { type: "button", className: "ungroup", textContent: "ungroup" }, li);
      b.addEventListener("click", () => {
        state.groups.splice(Number(s.id.slice(1)), 1);
        writePins();
        draw();
      });
    }
    renderSuggestions();
  }

  function renderSuggestions() {
    suggestList.textContent = "";
    const shown = suggested.list.filter((sg, i) => !suggested.dismissed.has(i) && !state.groups.some((grp) => sameSet(grp.members, sg.members)));
    suggested.list.forEach((sg, i) => {
      if (!shown.includes(sg)) return;
      const li = make("li", { className: "suggestion" }, suggestList);
      const input = make("input", { type: "text", value: sg.label, maxLength: 80 }, li);
      input.setAttribute("aria-label", "label of the suggested supernode");
      const names = sg.members.slice(0, 4).map((m) => (state.byId.has(m) ? label(state.byId.get(m)) : "#" + m)).join(", ");
      make("span", { className: "small", textContent: " " + sg.members.length + " nodes (" + names + (sg.members.length > 4 ? ", …" : "") + "): " + reasonText(sg.reasons) + " " }, li);
      const accept = make("button", { type: "button", className: "accept", textContent: "accept" }, li);
      accept.addEventListener("click", () => addGroup(input.value.trim() || sg.label, sg.members));
      const dismiss = make("button", { type: "button", className: "dismiss", textContent: "dismiss" }, li);
      dismiss.addEventListener("click", () => {
        suggested.dismissed.add(i);
        renderSuggestions();
      });
    });
    if (suggested.list.length && !shown.length) make("li", { className: "muted small", textContent: "all accepted or dismissed" }, suggestList);
  }

  function loadSuggestions() {
    fetch(frame.dataset.src + "/supernodes", { headers: { Accept: "application/json" } })
      .then((r) => (r.ok ? r.json() : Promise.reject(new Error("HTTP " + r.status))))
      .then((body) => {
        suggested.list = body.suggestions.filter((sg) => sg.members.every((m) => state.byId.has(m)));
        const t = body.thresholds;
        suggestStatus.textContent = " " + suggested.list.length + " found: feature nodes within " + t.max_pos_gap + " position(s) whose explanations' Jaccard ≥ " + t.explanation_jaccard +
          ", decoder cosine ≥ " + t.decoder_cosine + " (same layer) or co-firing Jaccard ≥ " + t.cofire_jaccard + " (mined layers)";
        renderSuggestions();
      })
      .catch((err) => { suggestStatus.textContent = " could not load suggestions: " + err.message; });
  }

  return { render: renderGroups, load: loadSuggestions };
};
