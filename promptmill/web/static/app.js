// The viewer's one script: live parts, figures, confirmations. No inline script anywhere (the pages'
// Content-Security-Policy allows scripts from the viewer only).
"use strict";

// A figure is its plotly JSON in data-figure; drawn here once plotly's script is loaded.
function drawFigures(root) {
  if (!window.Plotly) return;
  for (const node of root.querySelectorAll(".plot[data-figure]")) {
    const figure = JSON.parse(node.dataset.figure);
    node.removeAttribute("data-figure");
    window.Plotly.newPlot(node, figure.data, figure.layout, {responsive: true, displaylogo: false});
  }
}

// A part with data-live="URL" is read again every data-every ms and replaced; a part marked
// data-now is read at once too. A failed read keeps what is shown and tries again.
function keepLive(node) {
  const every = Number(node.dataset.every || 1500);
  const read = async () => {
    try {
      const answer = await fetch(node.dataset.live, {credentials: "same-origin", cache: "no-store"});
      if (answer.ok) {
        node.innerHTML = await answer.text();
        node.dataset.updated = String(Date.now());
        drawFigures(node);
      }
    } catch (error) { /* the viewer restarting: try again later */ }
    setTimeout(read, every);
  };
  setTimeout(read, "now" in node.dataset ? 0 : every);
}

document.addEventListener("DOMContentLoaded", () => {
  drawFigures(document);
  document.querySelectorAll("[data-live]").forEach(keepLive);
});

// An action asks first.
document.addEventListener("submit", (event) => {
  const question = event.target.dataset.confirm;
  if (question && !window.confirm(question)) event.preventDefault();
});
