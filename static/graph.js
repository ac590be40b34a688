// The attribution graph page (templates/graph.html; app/graphs.py serves the JSON it draws).
//
// An SVG built with DOM calls, offline and under the page's CSP (no inline script or style: geometry and colour are
// SVG attributes). Rows are layers (token embeddings at the bottom, logits at the top), columns token positions;
// a cell's nodes spread across its column. Edge width follows |weight|, colour its sign. Hover shows a node's
// feature (explanation, strongest tokens); click opens the feature page; shift-click pins a node, and the pinned
// nodes, kept in the URL's #pin=..., can be shown alone as a subgraph. Supernodes: pinned nodes merged under a label,
// or a group suggested by /api/v1/graphs/{slug}/supernodes and accepted (the panel: static/graph_groups.js), drawn
// as one node (members hidden, their edges summed), kept in the URL's #group=label~id.id|... so the view is shareable.
(function () {
  "use strict";

  const frame = document.getElementById("attribution-graph");
  if (!frame) return;
  const svg = document.getElementById("graph-svg");
  const tip = document.getElementById("graph-tip");
  const status = document.getElementById("graph-status");
  const pinnedOnly = document.getElementById("graph-pinned-only");
  const pinList = document.getElementById("graph-pin-list");
  const NS = "http://www.w3.org/2000/svg";
  const MAX_EDGES = 4000; // the strongest edges drawn; the rest add ink, not information
  const ROW = 30, LEFT = 56, TOP = 34, BOTTOM = 46, RIGHT = 16;
  const POS = "#2563eb", NEG = "#dc2626";
  const MIN_COLUMN = 44; // px per token position at the least

  const state = {
    graph: null, byId: new Map(), place: new Map(), nodeEls: new Map(), edgeEls: [], pins: new Set(),
    groups: [], // [{label, members: [node ids]}], in the URL's #group=
    supers: new Map(), // "s<i>" -> the drawn supernode of groups[i]
    panel: null, // static/graph_groups.js: render() after each draw, load() the suggestions once
  };

  function el(name, attrs, parent) {
    const e = document.createElementNS(NS, name);
    for (const k in attrs) e.setAttribute(k, attrs[k]);
    if (parent) parent.appendChild(e);
    return e;
  }

  function visibleText(t) {
    return t.replace(/ /g, "·").replace(/\n/g, "↵").replace(/\t/g, "→");
  }

  function readPins() {
    const m = /pin=([0-9,]*)/.exec(location.hash);
    state.pins = new Set(m && m[1] ? m[1].split(",").map(Number) : []);
    // #group=label~3.4.5|label~7.8: a label is URI-encoded (it has no "|"); its members follow the last "~"
    const g = /group=([^&]*)/.exec(location.hash);
    state.groups = [];
    for (const part of g && g[1] ? g[1].split("|") : []) {
      const cut = part.lastIndexOf("~");
      if (cut < 0) continue;
      const members = part.slice(cut + 1).split(".").filter((x) => /^[0-9]+$/.test(x)).map(Number);
      let text;
      try { text = decodeURIComponent(part.slice(0, cut)); } catch (err) { text = part.slice(0, cut); }
      if (members.length >= 2) state.groups.push({ label: text, members: members });
    }
  }

  function writePins() {
    const ids = Array.from(state.pins).sort((a, b) => a - b);
    const parts = [];
    if (ids.length) parts.push("pin=" + ids.join(","));
    if (state.groups.length) parts.push("group=" + state.groups.map((g) => encodeURIComponent(g.label) + "~" + g.members.join(".")).join("|"));
    history.replaceState(null, "", parts.length ? "#" + parts.join("&") : location.pathname + location.search);
  }

  function nodeById(id) {
    return typeof id === "string" ? state.supers.get(id) : state.byId.get(id);
  }

  function isPinned(id) {
    const s = typeof id === "string" ? state.supers.get(id) : null;
    return s ? s.members.some((m) => state.pins.has(m)) : state.pins.has(id);
  }

  function label(n) {
    if (n.kind === "embedding") return "token " + JSON.stringify(n.text) + " @" + n.pos;
    if (n.kind === "logit") return "output " + JSON.stringify(n.text) + " (p " + n.probability.toFixed(3) + ")";
    if (n.kind === "error") return "error node, layer " + n.layer + " @" + n.pos;
    if (n.kind === "supernode") return "supernode " + JSON.stringify(n.label) + " (" + n.members.length + " nodes)";
    return (n.sae ? n.sae : "layer " + n.layer) + " #" + n.feature + " @" + n.pos;
  }

  function layout(g) {
    const T = g.tokens.length;
    const width = Math.max(frame.clientWidth - 2, LEFT + RIGHT + T * MIN_COLUMN); // fits the frame; scrolls past 64 tokens
    const colW = (width - LEFT - RIGHT) / T;
    const rows = g.n_layers + 2;
    const height = TOP + rows * ROW + BOTTOM;
    const cells = new Map();
    for (const n of g.nodes) {
      if (n.kind === "logit") continue;
      const key = n.layer + ":" + n.pos;
      if (!cells.has(key)) cells.set(key, []);
      cells.get(key).push(n);
    }
    const y = (layer) => TOP + (g.n_layers - layer) * ROW + ROW / 2; // logits (layer n_layers) on top
    for (const list of cells.values()) {
      list.sort((a, b) => (a.kind === "error") - (b.kind === "error") || b.influence - a.influence);
      // a crowded cell wraps onto up to three lines inside its row, and its nodes shrink to fit
      const perLine = Math.max(1, Math.floor(colW / 10));
      const lines = Math.min(3, Math.ceil(list.length / perLine));
      const across = Math.ceil(list.length / lines);
      const r = Math.max(1.5, Math.min(5, colW / (across + 1) / 2.2, lines > 1 ? ROW / lines / 2.4 : 5));
      list.forEach((n, j) => {
        const line = Math.floor(j / across), k = j % across;
        const x0 = LEFT + n.pos * colW;
        const dy = lines > 1 ? (line - (lines - 1) / 2) * (ROW / lines) : 0;
        state.place.set(n.id, { x: x0 + ((k + 1) / (across + 1)) * colW, y: y(n.layer) + dy, r: r });
      });
    }
    const logits = g.nodes.filter((n) => n.kind === "logit").sort((a, b) => a.rank - b.rank);
    const span = Math.min(width - LEFT - RIGHT, logits.length * 90);
    logits.forEach((n, j) => {
      state.place.set(n.id, { x: width - RIGHT - span + ((j + 0.5) / logits.length) * span, y: y(g.n_layers) });
    });
    return { width, height, colW, y };
  }

  function draw() {
    const g = state.graph;
    svg.textContent = "";
    state.place.clear();
    state.nodeEls.clear();
    state.edgeEls = [];
    const { width, height, colW, y } = layout(g);
    svg.setAttribute("viewBox", "0 0 " + width + " " + height);
    svg.setAttribute("width", width);
    svg.setAttribute("height", height);
    const axis = el("g", { class: "axis" }, svg);
    for (let L = -1; L <= g.n_layers; L++) {
      const name = L === -1 ? "tokens" : L === g.n_layers ? "logits" : "L" + L;
      el("line", { x1: LEFT, x2: width - RIGHT, y1: y(L), y2: y(L), class: "row" }, axis);
      el("text", { x: 4, y: y(L) + 4, class: "row-label" }, axis).textContent = name;
    }
    g.tokens.forEach((t, p) => {
      const x = LEFT + (p + 0.5) * colW;
      const text = el("text", { x: x, y: height - BOTTOM / 2 + 6, class: "token", "text-anchor": "middle" }, axis);
      const shown = visibleText(t);
      text.textContent = shown.length > 10 ? shown.slice(0, 9) + "…" : shown;
      el("title", {}, text).textContent = t;
    });
    const edges = groupedEdges(g).sort((a, b) => Math.abs(b.weight) - Math.abs(a.weight)).slice(0, MAX_EDGES);
    const maxW = edges.length ? Math.abs(edges[0].weight) || 1 : 1;
    const edgeLayer = el("g", { class: "edges" }, svg);
    for (const e of edges) {
      const a = state.place.get(e.source), b = state.place.get(e.target);
      if (!a || !b) continue;
      const mid = (a.y + b.y) / 2;
      const path = el("path", {
        d: "M" + a.x.toFixed(1) + " " + a.y.toFixed(1) + " C" + a.x.toFixed(1) + " " + mid.toFixed(1) + " " + b.x.toFixed(1) + " " + mid.toFixed(1) + " " + b.x.toFixed(1) + " " + b.y.toFixed(1),
        stroke: e.weight >= 0 ? POS : NEG,
        "stroke-width": (0.3 + 4.5 * Math.abs(e.weight) / maxW).toFixed(2),
        fill: "none",
        class: "edge",
      }, edgeLayer);
      state.edgeEls.push({ e: e, path: path });
    }
    const nodeLayer = el("g", { class: "nodes" }, svg);
    for (const n of g.nodes) {
      const p = state.place.get(n.id);
      if (!p || state.memberOf.has(n.id)) continue; // a supernode's members are drawn as it
      let shape;
      if (n.kind === "feature") {
        shape = el("circle", { cx: p.x, cy: p.y, r: p.r, class: "node feature" + (n.url ? " linked" : "") }, nodeLayer);
      } else if (n.kind === "error") {
        const h = Math.min(3.5, p.r * 0.7);
        shape = el("rect", { x: p.x - h, y: p.y - h, width: 2 * h, height: 2 * h, class: "node error" }, nodeLayer);
      } else if (n.kind === "embedding") {
        shape = el("rect", { x: p.x - 6, y: p.y - 6, width: 12, height: 12, rx: 2, class: "node embedding" }, nodeLayer);
      } else {
        shape = el("g", { class: "node logit" }, nodeLayer);
        el("rect", { x: p.x - 40, y: p.y - 11, width: 80, height: 22, rx: 4 }, shape);
        const t = el("text", { x: p.x, y: p.y + 4, "text-anchor": "middle" }, shape);
        const shown = visibleText(n.text);
        t.textContent = (shown.length > 8 ? shown.slice(0, 7) + "…" : shown) + " " + (100 * n.probability).toFixed(0) + "%";
      }
      shape.dataset.node = n.id;
      state.nodeEls.set(n.id, shape);
    }
    for (const s of state.supers.values()) {
      const p = state.place.get(s.id);
      const shape = el("g", { class: "node supernode" }, nodeLayer);
      const shown = s.label.length > 22 ? s.label.slice(0, 21) + "…" : s.label;
      const w = Math.max(40, 6.2 * shown.length + 14);
      el("rect", { x: p.x - w / 2, y: p.y - 9, width: w, height: 18, rx: 9 }, shape);
      el("text", { x: p.x, y: p.y + 4, "text-anchor": "middle" }, shape).textContent = shown;
      shape.dataset.node = s.id;
      state.nodeEls.set(s.id, shape);
    }
    applyPins();
    if (state.panel) state.panel.render();
    const merged = state.supers.size ? " · " + state.supers.size + " supernode(s): " + edges.length + " edges drawn, parallel ones summed" : "";
    status.textContent = g.nodes.length + " nodes, " + g.edges.length + " edges" + (!merged && g.edges.length > edges.length ? " (the " + edges.length + " strongest drawn)" : "") + merged;
  }

  // --- supernodes ------------------------------------------------------------------------------------

  // The groups whose members are in this graph (a node in one group only: the first that claims it), their drawn
  // nodes at the members' centroid, and the edges with members replaced by their group, parallel ones summed.
  function groupedEdges(g) {
    state.supers.clear();
    state.memberOf = new Map();
    state.groups.forEach((grp, i) => {
      const members = grp.members.filter((m) => state.byId.has(m) && !state.memberOf.has(m) && state.byId.get(m).kind !== "logit");
      if (members.length < 2) return;
      const id = "s" + i;
      let x = 0, y = 0, influence = 0, layer = 0, pos = 0;
      for (const m of members) {
        const p = state.place.get(m), n = state.byId.get(m);
        x += p.x; y += p.y; influence += n.influence; layer = Math.max(layer, n.layer); pos = Math.max(pos, n.pos);
        state.memberOf.set(m, id);
      }
      state.supers.set(id, { id: id, kind: "supernode", label: grp.label, members: members, influence: influence, layer: layer, pos: pos });
      state.place.set(id, { x: x / members.length, y: y / members.length, r: 9 });
    });
    if (!state.supers.size) return g.edges.slice();
    const summed = new Map();
    for (const e of g.edges) {
      const s = state.memberOf.get(e.source) || e.source, t = state.memberOf.get(e.target) || e.target;
      if (s === t) continue; // inside a supernode
      const key = s + ">" + t;
      const had = summed.get(key);
      if (had) had.weight += e.weight;
      else summed.set(key, { source: s, target: t, weight: e.weight });
    }
    return Array.from(summed.values());
  }

  function visible(n) {
    if (!pinnedOnly.checked) return true;
    return n.kind === "embedding" || n.kind === "logit" || isPinned(n.id);
  }

  function applyPins() {
    for (const [id, shape] of state.nodeEls) {
      const n = nodeById(id);
      shape.classList.toggle("pinned", isPinned(id));
      shape.classList.toggle("hidden", !visible(n));
    }
    for (const { e, path } of state.edgeEls) {
      // the pinned subgraph: edges between shown nodes that touch a pinned one (not every token-to-logit edge)
      const shown = visible(nodeById(e.source)) && visible(nodeById(e.target));
      path.classList.toggle("hidden", !shown || (pinnedOnly.checked && !isPinned(e.source) && !isPinned(e.target)));
    }
    document.querySelectorAll("button.pin").forEach((b) => {
      const on = state.pins.has(Number(b.dataset.node));
      b.setAttribute("aria-pressed", on ? "true" : "false");
      b.textContent = on ? "unpin" : "pin";
    });
    pinList.textContent = "";
    if (!state.pins.size) {
      const li = document.createElement("li");
      li.className = "muted small";
      li.textContent = "none yet";
      pinList.appendChild(li);
    }
    for (const id of Array.from(state.pins).sort((a, b) => a - b)) {
      const n = state.byId.get(id);
      if (!n) continue;
      const li = document.createElement("li");
      li.appendChild(document.createTextNode(label(n) + (n.explanation ? ": " + n.explanation : "") + " "));
      if (n.url) {
        const a = document.createElement("a");
        a.href = n.url;
        a.textContent = "feature";
        li.appendChild(a);
        li.appendChild(document.createTextNode(" · "));
        const s = document.createElement("a");
        s.href = n.steer_url;
        s.textContent = "steer";
        li.appendChild(s);
        li.appendChild(document.createTextNode(" "));
      }
      const b = document.createElement("button");
      b.type = "button";
      b.textContent = "unpin";
      b.addEventListener("click", () => togglePin(id));
      li.appendChild(b);
      pinList.appendChild(li);
    }
  }

  function togglePin(id) {
    if (state.pins.has(id)) state.pins.delete(id);
    else state.pins.add(id);
    writePins();
    applyPins();
  }

  function nodeOf(target) {
    const shape = target.closest ? target.closest("[data-node]") : null;
    if (!shape || !svg.contains(shape)) return null;
    const id = shape.dataset.node;
    return /^s[0-9]+$/.test(id) ? state.supers.get(id) : state.byId.get(Number(id));
  }

  function showTip(n, ev) {
    tip.textContent = "";
    const head = document.createElement("strong");
    head.textContent = label(n);
    tip.appendChild(head);
    const lines = [];
    if (n.kind === "feature") {
      lines.push("activation " + n.activation.toPrecision(3) + " · influence " + n.influence.toPrecision(3));
      if (n.explanation) lines.push(n.explanation);
      if (n.top_token) lines.push("fires most on " + JSON.stringify(n.top_token));
      if (n.promotes && n.promotes.length) lines.push("promotes " + n.promotes.map((t) => JSON.stringify(t)).join(", "));
      lines.push(n.url ? "click: feature page · shift-click: pin" : "layer not mined: no feature page · click: pin");
    } else if (n.kind === "supernode") {
      lines.push("influence " + n.influence.toPrecision(3) + " (summed) · its edges are its members' summed");
      for (const m of n.members.slice(0, 8)) {
        const member = state.byId.get(m);
        if (member) lines.push("· " + label(member) + (member.explanation ? ": " + member.explanation : ""));
      }
      if (n.members.length > 8) lines.push("· and " + (n.members.length - 8) + " more");
      lines.push("ungroup it under Supernodes below");
    } else {
      lines.push("influence " + n.influence.toPrecision(3));
    }
    for (const line of lines) {
      const d = document.createElement("div");
      d.textContent = line;
      tip.appendChild(d);
    }
    const box = frame.getBoundingClientRect();
    tip.hidden = false;
    tip.style.left = Math.min(ev.clientX - box.left + frame.scrollLeft + 14, frame.scrollWidth - 300) + "px";
    let top = ev.clientY - box.top + frame.scrollTop + 14;
    if (top + tip.offsetHeight > frame.scrollTop + frame.clientHeight) top = Math.max(frame.scrollTop, top - tip.offsetHeight - 28); // above the cursor near the bottom
    tip.style.top = top + "px";
    for (const { e, path } of state.edgeEls) path.classList.toggle("hot", e.source === n.id || e.target === n.id);
  }

  svg.addEventListener("mousemove", (ev) => {
    const n = nodeOf(ev.target);
    if (n) showTip(n, ev);
    else if (!tip.hidden) {
      tip.hidden = true;
      for (const { path } of state.edgeEls) path.classList.remove("hot");
    }
  });
  svg.addEventListener("mouseleave", () => { tip.hidden = true; });
  svg.addEventListener("click", (ev) => {
    const n = nodeOf(ev.target);
    if (!n || n.kind === "supernode") return;
    if (n.url && !ev.shiftKey) location.href = n.url;
    else togglePin(n.id);
  });
  document.querySelectorAll("button.pin").forEach((b) => b.addEventListener("click", () => togglePin(Number(b.dataset.node))));
  pinnedOnly.addEventListener("change", applyPins);
  document.getElementById("graph-clear-pins").addEventListener("click", () => {
    state.pins.clear();
    writePins();
    applyPins();
  });

  // the supernodes panel (static/graph_groups.js), loaded beside this file; the graph draws without it if it fails
  const groupsReady = new Promise((resolve) => {
    const script = document.createElement("script");
    script.src = new URL("graph_groups.js", document.currentScript ? document.currentScript.src : location.origin + "/static/").href;
    script.onload = () => resolve(window.saescopeGraphGroups || null);
    script.onerror = () => resolve(null);
    document.head.appendChild(script);
  });

  readPins();
  Promise.all([fetch(frame.dataset.src, { headers: { Accept: "application/json" } }), groupsReady])
    .then(([r, makePanel]) => {
      if (makePanel) state.panel = makePanel({ state: state, frame: frame, label: label, draw: draw, writePins: writePins });
      return r.ok ? r.json() : Promise.reject(new Error("HTTP " + r.status));
    })
    .then((g) => {
      state.graph = g;
      for (const n of g.nodes) state.byId.set(n.id, n);
      draw();
      if (state.panel) state.panel.load();
    })
    .catch((err) => { status.textContent = "could not load the graph: " + err.message; });
})();
