// Copy-link buttons: copy the absolute permalink given in data-link and say so on the button.
document.addEventListener("click", async (event) => {
  const button = event.target.closest("[data-copy-link]");
  if (!button) return;
  const url = new URL(button.dataset.copyLink, window.location.origin).href;
  try {
    await navigator.clipboard.writeText(url);
    button.textContent = "Copied";
  } catch (err) {
    window.prompt("Copy this link:", url);   // clipboard API needs a secure context
  }
  button.dataset.copied = url;
});
