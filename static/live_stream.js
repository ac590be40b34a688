// Streamed live results (server-sent events read with fetch: EventSource cannot POST, and a POST is what
// the accounts' rate limits and CSRF check count). A form with data-stream posts its fields there; each
// `token` event's text is appended to the column of its `which`, `done` shows the permalink, `error` the
// reason. The form's own GET link is the permalink: submitting puts it in the address bar. Leaving the
// page (or sending again) aborts the request, which stops the generation on the server.
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
    const columns = {};
    const html = target.querySelector(".stream-html");
    if (html) html.textContent = "";
    target.querySelectorAll(".stream-text").forEach((el) => { el.textContent = ""; columns[el.dataset.which] = el; });
    target.dataset.events = "0";
    target.hidden = false;
    target.setAttribute("aria-busy", "true");
    state.textContent = "generating…";
    const fields = new FormData(form);
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
      target.classList.remove("stream-error");
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
            state.textContent = `generating the ${data.which} reply…`;
          } else if (event === "progress") {
            const bar = target.querySelector(".stream-progress");
            if (bar) { bar.max = data.total; bar.value = data.done; }
            state.textContent = `${data.stage}: ${data.done} of ${data.total} tokens`;
          } else if (event === "done" && data.html !== undefined) {
            target.querySelector(".stream-html").innerHTML = data.html;  // our server's fragment: markup and SVG, no script
            state.textContent = "";
            const bar = target.querySelector(".stream-progress");
            if (bar) bar.value = bar.max;
            history.replaceState(null, "", data.permalink);
            target.dataset.done = "true";
          } else if (event === "done") {
            ["default", "steered"].forEach((w) => { if (columns[w]) columns[w].textContent = data[w].text; });
            state.textContent = "";
            const note = `${data.default.token_ids.length} and ${data.steered.token_ids.length} tokens · run ${data.run_id} · `;
            state.append(note);
            const a = document.createElement("a");
            a.href = data.permalink;
            a.className = "permalink";
            a.textContent = "Permalink";
            state.append(a);
            target.dataset.done = "true";
          } else if (event === "error" && data.status === 503 && data.retry_after) {
            // loading or busy: ask again by itself after the Retry-After, as the htmx pages do
            state.textContent = `${data.detail}; trying again in ${Math.round(data.retry_after)} s…`;
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
    delete document.querySelector(form.dataset.target).dataset.done;
    run(form);
  });
  window.addEventListener("pagehide", () => { if (running) running.abort(); });
  document.addEventListener("DOMContentLoaded", () => {
    document.querySelectorAll("form[data-stream][data-autostart]").forEach((form) => run(form));
  });
})();
