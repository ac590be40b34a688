// The inference page: clicking a token shows its list of features (rendered with the tokens, hidden).
document.addEventListener("click", (event) => {
  const token = event.target.closest(".live-tokens .tok[data-tok]");
  if (!token) return;
  const root = token.closest(".card");
  root.querySelectorAll(".token-features").forEach((panel) => { panel.hidden = true; });
  root.querySelectorAll(".tok.selected").forEach((t) => t.classList.remove("selected"));
  const panel = root.querySelector(`#tok-features-${token.dataset.tok}`);
  if (panel) panel.hidden = false;
  token.classList.add("selected");
});
