// Streamed live results (server-sent events read with fetch: EventSource cannot POST, and a POST is what
// the accounts' rate limits and CSRF check count). A form with data-stream posts its fields there; each
// `token` event's text is appended to the column of its `which` (default, steered, frozen), `progress`
// moves the bar, `done` shows the permalink (and the server's result fragment, `html`, where the page has a
// .stream-html: the streamed columns, .stream-live, give way to it), `error` the reason. The address bar
// takes the form's own GET link at the start and the answer's permalink at the end (a form marked
// data-open-result opens the answer's `url` instead: the graphs page's build). A column marked
// data-if-field shows only when the form sends that field (the steering page's frozen column). Leaving
// the page (or sending again) aborts the request, which stops the generation on the server.
(function () {
  let running = null;

  function csrf() {
    const m = document.cookie.match(/(?:^|;\s*)saescope_csrf=([^;]+)/);
    return m ? decodeURIComponent(m[1]) : null;
  }

  function parse(block) {
    let event = "message";
    const data = [];
    block.split("\n").forEach((line) => {
      if (line.startsWith("event: ")) event = line.slice(7);
      else if (line.startsWith("data: ")) data.push(line.slice(6));
    });
    return { event, data: data.length ? JSON.parse(data.join("\n")) : null };
  }

  async function run(form) {
    if (running) running.abort();
    const controller = new AbortController();
    running = controller;
    const target = document.querySelector(form.dataset.target);
    const state = target.querySelector(".stream-state");
    const fields = new FormData(form);
    const columns = {};
    const html = target.querySelector(".stream-html");
    if (html) html.textContent = "";
    target.querySelectorAll(".stream-live").forEach((el) => { el.hidden = false; });
    target.querySelectorAll("[data-if-field]").forEach((el) => { el.hidden = !fields.get(el.dataset.ifField); });
    target.querySelectorAll(".stream-text").forEach((el) => { el.textContent = ""; columns[el.dataset.which] = el; });
    target.dataset.events = "0";
    delete target.dataset.done;
    delete target.dataset.waiting;
    target.classList.remove("stream-error");
    target.hidden = false;
    target.setAttribute("aria-busy", "true");
    state.textContent = form.dataset.busy || "generating…";
    const link = `${form.action}?${new URLSearchParams(fields)}`;
    history.replaceState(null, "", link);
    const headers = { Accept: "text/event-stream" };
    const token = csrf();
    if (token) headers["X-CSRF-Token"] = token;
    try {
      const response = await fetch(form.dataset.stream, { method: "POST", body: fields, headers, signal: controller.signal });
      if (!response.ok) {
        let reason = response.statusText;
        try { const body = await response.json(); reason = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail); } catch (e) { /* not JSON */ }
        state.textContent = `${response.status}: ${reason}`;
        target.classList.add("stream-error");
        return;
      }
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const { event, data } = parse(buffer.slice(0, cut));
          buffer = buffer.slice(cut + 2);
          if (event === "token" && columns[data.which]) {
            columns[data.which].textContent += data.text;
            target.dataset.events = String(Number(target.dataset.events || 0) + 1);
            state.textContent = `generating: ${data.which}…`;
          } else if (event === "progress") {
            const bar = target.querySelector(".stream-progress");
            if (bar) { bar.max = data.total; bar.value = data.done; }
            state.textContent = `${data.stage}: ${data.done} of ${data.total} ${data.unit || "tokens"}`;
          } else if (event === "done") {
            // the streamed columns keep what streamed (each `which`'s texts concatenate to its final text)
            state.textContent = "";
            if (html && data.html !== undefined) {
              html.innerHTML = data.html;  // our server's fragment: markup and SVG, no script
              target.querySelectorAll(".stream-live").forEach((el) => { el.hidden = true; });
            } else if (data.default) {
              const counts = ["default", "steered", "frozen"].filter((w) => data[w]).map((w) => data[w].token_ids.length);
              state.append(`${counts.join(" and ")} tokens · run ${data.run_id} · `);
              const a = document.createElement("a");
              a.href = data.permalink;
              a.className = "permalink";
              a.textContent = "Permalink";
              state.append(a);
            }
            const bar = target.querySelector(".stream-progress");
            if (bar) bar.value = bar.max;
            if (data.permalink) history.replaceState(null, "", data.permalink);
            target.dataset.done = "true";
            if (form.dataset.openResult !== undefined && data.url) window.location.assign(data.url);  // the built graph's page
          } else if (event === "error" && data.status === 503 && data.retry_after) {
            // loading or busy: ask again by itself after the Retry-After, as the htmx pages do
            state.textContent = `${data.detail}; trying again in ${Math.round(data.retry_after)} s…`;
            target.dataset.waiting = "true";
            setTimeout(() => { if (!running) run(form); }, data.retry_after * 1000);
          } else if (event === "error") {
            state.textContent = `${data.status}: ${data.detail}`;
            target.classList.add("stream-error");
          }
        }
      }
    } catch (e) {
      if (e.name !== "AbortError") state.textContent = `the stream broke off: ${e.message}`;
    } finally {
      target.removeAttribute("aria-busy");
      if (running === controller) running = null;
    }
  }

  document.addEventListener("submit", (event) => {
    const form = event.target;
    if (!(form instanceof HTMLFormElement) || !form.dataset.stream) return;
    event.preventDefault();
    run(form);
  });
  window.addEventListener("pagehide", () => { if (running) running.abort(); });
  document.addEventListener("DOMContentLoaded", () => {
    document.querySelectorAll("form[data-stream][data-autostart]").forEach((form) => run(form));
  });
})();
