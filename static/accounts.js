// With accounts on (app/accounts), every state-changing request must carry the session's CSRF token.
// The server puts it in the readable cookie saescope_csrf; this copies it into the X-CSRF-Token header of
// htmx requests and into a hidden csrf_token field of POST forms (pages are cached and shared by everyone,
// so the token cannot be written into them).
(function () {
  function token() {
    const m = document.cookie.match(/(?:^|;\s*)saescope_csrf=([^;]+)/);
    return m ? decodeURIComponent(m[1]) : null;
  }
  document.addEventListener("htmx:configRequest", function (event) {
    const t = token();
    if (t) event.detail.headers["X-CSRF-Token"] = t;
  });
  document.addEventListener("submit", function (event) {
    const form = event.target;
    if (!(form instanceof HTMLFormElement) || form.method.toLowerCase() !== "post") return;
    const t = token();
    if (!t) return;
    let field = form.querySelector('input[name="csrf_token"]');
    if (!field) {
      field = document.createElement("input");
      field.type = "hidden";
      field.name = "csrf_token";
      form.appendChild(field);
    }
    field.value = t;
  }, true);
})();
