// The feature map page (templates/map.html; app/feature_map.py serves its data).
//
// Drawn with our own canvas code, offline and under the page's CSP (no inline script or style): the
// points arrive as one packed binary (points.bin: typed arrays, no per-point objects), each frame is
// one pass over them writing pixels into an ImageData, and hover finds its point through a uniform
// grid of the points' cells, so 65k points pan and zoom at frame rate with no per-point DOM.
// Labels (strongest token, explanation) load after the points, for the tooltip.
(function () {
  "use strict";

  const frame = document.getElementById("feature-map");
  if (!frame) return;
  const canvas = document.getElementById("map-canvas");
  const ctx = canvas.getContext("2d");
  const tip = document.getElementById("map-tip");
  const status = document.getElementById("map-status");
  const colourSelect = document.getElementById("map-colour");
  const legend = document.getElementById("map-legend");
  const searchForm = document.getElementById("map-search");
  const queryInput = document.getElementById("map-query");

  const HIT_RADIUS = 8; // CSS px around the cursor that count as "on" a point
  const BG = 0xffffffff; // ImageData is little-endian RGBA: 0xAABBGGRR
  const NO_CLUSTER = rgba(200, 204, 209);
  const DIM = rgba(214, 217, 221);
  const HIT = rgba(228, 87, 46);
  const VIRIDIS = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];

  const map = {
    n: 0, x: null, y: null, index: null, cluster: null, logDensity: null, nClusters: 0,
    labels: null, hits: null, nHits: 0, mode: "density", colours: null,
    scale: 1, tx: 0, ty: 0, width: 0, height: 0, dpr: 1,
    hover: -1, marked: -1, grid: null, image: null, pixels: null, pending: false, lastDrawMs: 0, ready: false,
  };

  function rgba(r, g, b) {
    return (0xff000000 | (b << 16) | (g << 8) | r) >>> 0;
  }

  function ramp(t) {
    const s = Math.min(Math.max(t, 0), 1) * (VIRIDIS.length - 1);
    const i = Math.min(Math.floor(s), VIRIDIS.length - 2);
    const f = s - i;
    const a = VIRIDIS[i], b = VIRIDIS[i + 1];
    return rgba(Math.round(a[0] + f * (b[0] - a[0])), Math.round(a[1] + f * (b[1] - a[1])), Math.round(a[2] + f * (b[2] - a[2])));
  }

  function clusterColour(c) {
    if (c < 0) return NO_CLUSTER;
    const h = (c * 137.508) % 360, s = 0.65, l = c % 2 ? 0.42 : 0.52; // golden-angle hues: neighbours differ
    const k = (m) => (m + h / 30) % 12;
    const a = s * Math.min(l, 1 - l);
    const f = (m) => Math.round(255 * (l - a * Math.max(-1, Math.min(k(m) - 3, 9 - k(m), 1))));
    return rgba(f(0), f(8), f(4));
  }

  // --- data ---------------------------------------------------------------------------------------

  function parsePoints(buffer) {
    const view = new DataView(buffer);
    const magic = String.fromCharCode(view.getUint8(0), view.getUint8(1), view.getUint8(2), view.getUint8(3));
    if (magic !== "SMAP" || view.getUint32(4, true) !== 1) throw new Error("points.bin: not a version 1 map");
    const n = view.getUint32(8, true);
    map.nClusters = view.getUint32(12, true);
    let offset = 16;
    const take = (Type) => { const a = new Type(buffer, offset, n); offset += 4 * n; return a; };
    map.x = take(Float32Array); map.y = take(Float32Array); map.index = take(Int32Array);
    map.cluster = take(Int32Array); map.logDensity = take(Float32Array);
    map.n = n;
  }

  // Uniform grid over the points' bounds, as compressed rows: cell c holds items[start[c] .. start[c+1]).
  function buildGrid() {
    let x0 = Infinity, x1 = -Infinity, y0 = Infinity, y1 = -Infinity;
    for (let i = 0; i < map.n; i++) {
      const x = map.x[i], y = map.y[i];
      if (x < x0) x0 = x; if (x > x1) x1 = x; if (y < y0) y0 = y; if (y > y1) y1 = y;
    }
    const side = Math.max(1, Math.min(512, Math.ceil(Math.sqrt(map.n / 4))));
    const w = Math.max((x1 - x0) / side, 1e-9), h = Math.max((y1 - y0) / side, 1e-9);
    const cellOf = new Int32Array(map.n), start = new Int32Array(side * side + 1);
    for (let i = 0; i < map.n; i++) {
      const cx = Math.min(side - 1, Math.floor((map.x[i] - x0) / w)), cy = Math.min(side - 1, Math.floor((map.y[i] - y0) / h));
      cellOf[i] = cy * side + cx;
      start[cellOf[i] + 1]++;
    }
    for (let c = 0; c < side * side; c++) start[c + 1] += start[c];
    const fill = start.slice(0, side * side), items = new Int32Array(map.n);
    for (let i = 0; i < map.n; i++) items[fill[cellOf[i]]++] = i;
    map.grid = { x0, y0, x1, y1, w, h, side, start, items };
  }

  function recolour() {
    const colours = new Uint32Array(map.n);
    if (map.mode === "cluster") {
      const palette = new Map();
      for (let i = 0; i < map.n; i++) {
        const c = map.cluster[i];
        if (!palette.has(c)) palette.set(c, clusterColour(c));
        colours[i] = palette.get(c);
      }
    } else if (map.mode === "search") {
      for (let i = 0; i < map.n; i++) colours[i] = map.hits && map.hits[i] ? HIT : DIM;
    } else {
      let lo = Infinity, hi = -Infinity;
      for (let i = 0; i < map.n; i++) { const d = map.logDensity[i]; if (d < lo) lo = d; if (d > hi) hi = d; }
      const lut = new Uint32Array(256);
      for (let k = 0; k < 256; k++) lut[k] = ramp(k / 255);
      const span = hi > lo ? 255 / (hi - lo) : 0;
      for (let i = 0; i < map.n; i++) colours[i] = lut[Math.round((map.logDensity[i] - lo) * span)];
      map.densityRange = [lo, hi];
    }
    map.colours = colours;
    drawLegend();
    requestDraw();
  }

  function drawLegend() {
    legend.textContent = "";
    const add = (cls, text) => {
      const s = document.createElement("span");
      if (cls) s.className = cls;
      if (text) s.textContent = text;
      legend.appendChild(s);
      return s;
    };
    if (map.mode === "density" && map.densityRange) {
      const pct = (v) => (100 * Math.pow(10, v)).toPrecision(2) + "%";
      add("", "firing density " + pct(map.densityRange[0]));
      add("ramp");
      add("", pct(map.densityRange[1]) + " (log scale)");
    } else if (map.mode === "cluster") {
      add("", map.nClusters + " clusters (HDBSCAN on the map), grey: in none");
    } else {
      const hit = add("", ""), other = add("", "");
      hit.appendChild(Object.assign(document.createElement("span"), { className: "swatch hit" }));
      hit.appendChild(document.createTextNode(map.hits ? map.nHits.toLocaleString() + " matching" : "search to light features up"));
      other.appendChild(Object.assign(document.createElement("span"), { className: "swatch other" }));
      other.appendChild(document.createTextNode("the others"));
    }
  }

  // --- view ---------------------------------------------------------------------------------------

  function resize() {
    const rect = canvas.getBoundingClientRect();
    map.dpr = window.devicePixelRatio || 1;
    const w = Math.max(1, Math.round(rect.width * map.dpr)), h = Math.max(1, Math.round(rect.height * map.dpr));
    if (w !== canvas.width || h !== canvas.height) {
      const first = map.width === 0;
      canvas.width = w; canvas.height = h;
      map.width = rect.width; map.height = rect.height;
      map.image = ctx.createImageData(w, h);
      map.pixels = new Uint32Array(map.image.data.buffer);
      if (first && map.grid) fit();
    }
    requestDraw();
  }

  function fit() {
    const g = map.grid;
    const pad = 24;
    const sx = (map.width - 2 * pad) / Math.max(g.x1 - g.x0, 1e-9), sy = (map.height - 2 * pad) / Math.max(g.y1 - g.y0, 1e-9);
    map.scale = Math.max(1e-6, Math.min(sx, sy));
    map.tx = map.width / 2 - map.scale * (g.x0 + g.x1) / 2;
    map.ty = map.height / 2 + map.scale * (g.y0 + g.y1) / 2;
    requestDraw();
  }

  // map (x, y) -> CSS px: x right, y up
  const toScreenX = (x) => x * map.scale + map.tx;
  const toScreenY = (y) => -y * map.scale + map.ty;

  function requestDraw() {
    if (!map.pending && map.n) {
      map.pending = true;
      requestAnimationFrame(() => { map.pending = false; draw(); });
    }
  }

  // One pass over the typed arrays: each point a small square of pixels; search hits a second, larger pass.
  function draw() {
    if (!map.pixels || !map.colours) return;
    const t0 = performance.now();
    const px = map.pixels, W = canvas.width, H = canvas.height, dpr = map.dpr;
    const s = map.scale * dpr, tx = map.tx * dpr, ty = map.ty * dpr;
    const zoom = map.fitScale ? map.scale / map.fitScale : 1;
    // a few pixels a point: more where the map has room for them (few points), and more when zoomed in
    const base = Math.min(6, Math.max(2, Math.round(Math.sqrt((map.width * map.height) / Math.max(map.n, 1)) / 10)));
    const size = Math.max(1, Math.round(dpr * (base + (zoom > 6 ? 2 : zoom > 2 ? 1 : 0))));
    px.fill(BG);
    const square = (i, size) => {
      const cx = Math.round(map.x[i] * s + tx), cy = Math.round(-map.y[i] * s + ty);
      const half = size >> 1, x0 = cx - half, y0 = cy - half;
      if (x0 < 0 || y0 < 0 || x0 + size > W || y0 + size > H) return;
      const c = map.colours[i];
      for (let r = 0; r < size; r++) px.fill(c, (y0 + r) * W + x0, (y0 + r) * W + x0 + size);
    };
    const searching = map.mode === "search" && map.hits;
    for (let i = 0; i < map.n; i++) if (!searching || !map.hits[i]) square(i, size);
    if (searching) for (let i = 0; i < map.n; i++) if (map.hits[i]) square(i, size + Math.round(2 * dpr));
    ctx.putImageData(map.image, 0, 0);
    ctx.save();
    ctx.scale(dpr, dpr);
    for (const [i, colour, r] of [[map.marked, "#e4572e", 9], [map.hover, "#111827", 7]]) {
      if (i < 0) continue;
      ctx.beginPath();
      ctx.arc(toScreenX(map.x[i]), toScreenY(map.y[i]), r, 0, 2 * Math.PI);
      ctx.lineWidth = 2;
      ctx.strokeStyle = colour;
      ctx.stroke();
    }
    ctx.restore();
    map.lastDrawMs = performance.now() - t0;
  }

  function panBy(dx, dy) {
    map.tx += dx; map.ty += dy;
    requestDraw();
  }

  function zoomAt(factor, cx, cy) {
    const next = Math.min(Math.max(map.scale * factor, map.fitScale / 4), map.fitScale * 2000);
    const f = next / map.scale;
    map.tx = cx - (cx - map.tx) * f;
    map.ty = cy - (cy - map.ty) * f;
    map.scale = next;
    requestDraw();
  }

  // The point nearest to CSS px (cx, cy) within HIT_RADIUS, through the grid's cells around it; -1: none.
  function pointAt(cx, cy) {
    const g = map.grid;
    if (!g) return -1;
    const x = (cx - map.tx) / map.scale, y = -(cy - map.ty) / map.scale, r = HIT_RADIUS / map.scale;
    const c0 = Math.max(0, Math.floor((x - r - g.x0) / g.w)), c1 = Math.min(g.side - 1, Math.floor((x + r - g.x0) / g.w));
    const r0 = Math.max(0, Math.floor((y - r - g.y0) / g.h)), r1 = Math.min(g.side - 1, Math.floor((y + r - g.y0) / g.h));
    let best = -1, bestD = r * r;
    for (let row = r0; row <= r1; row++) {
      for (let col = c0; col <= c1; col++) {
        const c = row * g.side + col;
        for (let k = g.start[c]; k < g.start[c + 1]; k++) {
          const i = g.items[k], dx = map.x[i] - x, dy = map.y[i] - y, d = dx * dx + dy * dy;
          if (d <= bestD) { bestD = d; best = i; }
        }
      }
    }
    return best;
  }

  function positionOf(featureIndex) {
    let lo = 0, hi = map.n - 1; // points are in feature-index order
    while (lo <= hi) {
      const mid = (lo + hi) >> 1, v = map.index[mid];
      if (v === featureIndex) return mid;
      if (v < featureIndex) lo = mid + 1; else hi = mid - 1;
    }
    return -1;
  }

  // --- interaction --------------------------------------------------------------------------------

  function showTip(i, cx, cy) {
    if (i < 0) { tip.hidden = true; return; }
    tip.textContent = "";
    const line = (cls, text) => {
      const d = document.createElement("div");
      d.className = cls;
      d.textContent = text;
      tip.appendChild(d);
      return d;
    };
    const cluster = map.cluster[i] >= 0 ? "cluster " + map.cluster[i] : "no cluster";
    line("tip-head", "#" + map.index[i] + " · " + cluster + " · density " + (100 * Math.pow(10, map.logDensity[i])).toPrecision(2) + "%");
    if (map.labels) {
      const token = map.labels.tokens[i], explanation = map.labels.explanations[i];
      const t = line("tip-tok", "strongest token ");
      const code = document.createElement("span");
      code.className = "tip-token";
      code.textContent = token === null ? "–" : token;
      t.appendChild(code);
      line("tip-expl", explanation || "no explanation yet");
      const label = map.labels.labels ? map.labels.labels[i] : null;
      if (label) line("tip-label", "label: " + label); // the team's annotation (textContent: never markup)
    } else {
      line("muted", "loading labels…");
    }
    tip.hidden = false;
    const left = Math.min(cx + 14, map.width - tip.offsetWidth - 4), top = Math.min(cy + 14, map.height - tip.offsetHeight - 4);
    tip.style.left = Math.max(4, left) + "px"; // CSSOM: allowed by the CSP, unlike a style attribute
    tip.style.top = Math.max(4, top) + "px";
  }

  function local(event) {
    const rect = canvas.getBoundingClientRect();
    return [event.clientX - rect.left, event.clientY - rect.top];
  }

  let drag = null;
  canvas.addEventListener("pointerdown", (event) => {
    const [x, y] = local(event);
    drag = { x, y, moved: false };
    canvas.setPointerCapture(event.pointerId);
  });
  canvas.addEventListener("pointermove", (event) => {
    const [x, y] = local(event);
    if (drag) {
      if (drag.moved || Math.abs(x - drag.x) + Math.abs(y - drag.y) > 3) {
        drag.moved = true;
        canvas.classList.add("dragging");
        panBy(x - drag.x, y - drag.y);
        drag.x = x; drag.y = y;
        tip.hidden = true;
      }
      return;
    }
    const i = pointAt(x, y);
    if (i !== map.hover) { map.hover = i; requestDraw(); }
    canvas.classList.toggle("on-point", i >= 0);
    showTip(i, x, y);
  });
  canvas.addEventListener("pointerup", (event) => {
    const wasClick = drag && !drag.moved;
    drag = null;
    canvas.classList.remove("dragging");
    if (!wasClick) return;
    const [x, y] = local(event);
    const i = pointAt(x, y);
    if (i >= 0) window.location.assign(frame.dataset.features + map.index[i]);
  });
  canvas.addEventListener("pointerleave", () => { if (!drag) { map.hover = -1; tip.hidden = true; requestDraw(); } });
  canvas.addEventListener("wheel", (event) => {
    event.preventDefault();
    const [x, y] = local(event);
    zoomAt(Math.exp(-event.deltaY * (event.deltaMode ? 0.05 : 0.0015)), x, y);
  }, { passive: false });

  colourSelect.addEventListener("change", () => { map.mode = colourSelect.value; recolour(); });
  document.getElementById("map-reset").addEventListener("click", () => { fit(); });

  searchForm.addEventListener("submit", async (event) => {
    event.preventDefault();
    const q = queryInput.value.trim();
    if (!q) { map.hits = null; map.nHits = 0; recolour(); return; }
    status.textContent = "searching…";
    const response = await fetch(frame.dataset.search + "?q=" + encodeURIComponent(q));
    if (!response.ok) { status.textContent = "search failed (" + response.status + ")"; return; }
    const found = await response.json();
    const hits = new Uint8Array(map.n);
    let n = 0;
    for (const featureIndex of found.indices) {
      const i = positionOf(featureIndex);
      if (i >= 0) { hits[i] = 1; n++; }
    }
    map.hits = hits; map.nHits = n; map.mode = "search"; colourSelect.value = "search";
    status.textContent = n.toLocaleString() + " features match “" + q + "” (" + found.explanation_matches.toLocaleString() +
      " by explanation, " + found.token_matches.toLocaleString() + " by strongest token)";
    recolour();
  });

  function markFromHash() {
    const m = /^#f=(\d+)$/.exec(window.location.hash);
    if (!m) return;
    const i = positionOf(Number(m[1]));
    map.marked = i;
    if (i < 0) { status.textContent = "feature #" + m[1] + " is not on the map (it never fired)"; return; }
    map.scale = map.fitScale * 4;
    map.tx = map.width / 2 - map.x[i] * map.scale;
    map.ty = map.height / 2 + map.y[i] * map.scale;
    requestDraw();
  }
  window.addEventListener("hashchange", markFromHash);

  // For tests and bench/map_speed.py: where a feature is drawn, and the view's controls.
  window.saescopeMap = {
    get ready() { return map.ready; },
    get labelsReady() { return map.labels !== null; },
    get n() { return map.n; },
    get lastDrawMs() { return map.lastDrawMs; },
    screenPosition(featureIndex) {
      const i = positionOf(featureIndex);
      return i < 0 ? null : [toScreenX(map.x[i]), toScreenY(map.y[i])];
    },
    pointAt, panBy, zoomAt, draw, fit,
  };

  async function load() {
    try {
      const response = await fetch(frame.dataset.points);
      if (!response.ok) throw new Error("points: HTTP " + response.status);
      parsePoints(await response.arrayBuffer());
      buildGrid();
      new ResizeObserver(resize).observe(canvas);
      resize();
      fit();
      map.fitScale = map.scale;
      recolour();
      markFromHash();
      status.textContent = map.n.toLocaleString() + " features";
      map.ready = true;
      const labels = await fetch(frame.dataset.labels);
      if (labels.ok) map.labels = await labels.json();
    } catch (error) {
      status.textContent = "could not load the map: " + error.message;
    }
  }
  load();
})();
