"""Small scatter plots drawn as SVG by us (no plotting library, no script): axes with ticks and labels,
one series per group (an architecture on /compare) with its own colour and marker shape, points joined
in x order, optional vertical spread bars (min to max over seeds), a legend, and a tooltip and link per
point. Presentation attributes only (fill, stroke): the Content-Security-Policy allows no inline style.

Every text that reaches the SVG goes through `markupsafe.escape`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from markupsafe import Markup, escape

# Colour-blind-safe (Okabe-Ito), and a marker shape per series too, so that a grey print still tells them apart.
COLOURS = ("#0072b2", "#d55e00", "#009e73", "#cc79a7", "#e69f00", "#56b4e9", "#000000", "#f0e442")
MARKERS = ("circle", "square", "triangle", "diamond", "cross", "circle", "square", "triangle")


@dataclass
class Point:
    x: float
    y: float
    label: str  # the tooltip
    href: str | None = None
    y_min: float | None = None  # spread bar (e.g. min and max over seeds)
    y_max: float | None = None


@dataclass
class Series:
    name: str
    points: list[Point] = field(default_factory=list)
    style: int = 0  # index into COLOURS and MARKERS


@dataclass
class Axis:
    label: str
    log2: bool = False  # ticks at powers of two (L0, widths)
    percent: bool = False  # ticks printed as percentages of 1


def _nice_step(span: float, target: int) -> float:
    raw = span / max(1, target)
    mag = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if raw <= m * mag:
            return m * mag
    return 10 * mag


def linear_ticks(lo: float, hi: float, target: int = 5) -> tuple[float, float, list[float]]:
    """(axis min, axis max, ticks): a range that holds [lo, hi] with round ticks."""
    if hi - lo < 1e-12:
        pad = abs(hi) * 0.05 or 0.5
        lo, hi = lo - pad, hi + pad
    step = _nice_step(hi - lo, target)
    start, stop = math.floor(lo / step) * step, math.ceil(hi / step) * step
    n = int(round((stop - start) / step))
    return start, stop, [start + i * step for i in range(n + 1)]


def log2_ticks(lo: float, hi: float) -> tuple[float, float, list[float]]:
    """(axis min, axis max, ticks) in log2 units: the powers of two around [lo, hi] (positive values)."""
    a, b = math.log2(lo), math.log2(hi)
    start, stop = math.floor(a), math.ceil(b)
    if stop == start:
        start, stop = start - 1, stop + 1
    step = max(1, math.ceil((stop - start) / 8))
    return start, stop, [float(e) for e in range(start, stop + 1, step)]


def _tick_text(value: float, axis: Axis) -> str:
    if axis.log2:
        v = 2**value
        return f"{v / 1024:g}k" if v >= 1024 else f"{v:g}"
    if axis.percent:
        return f"{100 * value:.4g}%"
    return f"{value:.4g}"


def _marker(shape: int, x: float, y: float, colour: str) -> str:
    r = 4.5
    kind = MARKERS[shape % len(MARKERS)]
    common = f'fill="{colour}" stroke="#fff" stroke-width="1"'
    if kind == "square":
        return f'<rect x="{x - r:.1f}" y="{y - r:.1f}" width="{2 * r:.1f}" height="{2 * r:.1f}" {common}/>'
    if kind == "triangle":
        return f'<path d="M{x:.1f} {y - r - 1:.1f}L{x + r + 0.5:.1f} {y + r:.1f}L{x - r - 0.5:.1f} {y + r:.1f}Z" {common}/>'
    if kind == "diamond":
        return f'<path d="M{x:.1f} {y - r - 1:.1f}L{x + r + 1:.1f} {y:.1f}L{x:.1f} {y + r + 1:.1f}L{x - r - 1:.1f} {y:.1f}Z" {common}/>'
    if kind == "cross":
        return (
            f'<path d="M{x - r:.1f} {y - r:.1f}L{x + r:.1f} {y + r:.1f}M{x + r:.1f} {y - r:.1f}L{x - r:.1f} {y + r:.1f}" '
            f'stroke="{colour}" stroke-width="2.5" fill="none"/>'
        )
    return f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{r}" {common}/>'


def scatter_svg(title: str, x_axis: Axis, y_axis: Axis, series: list[Series], width: int = 440, height: int = 300) -> Markup:
    """One plot. Points with a non-finite coordinate (or a non-positive one on a log axis) are left out;
    with no point left the plot says so instead of drawing empty axes."""

    def usable(p: Point) -> bool:
        ok = math.isfinite(p.x) and math.isfinite(p.y)
        return ok and (p.x > 0 if x_axis.log2 else True) and (p.y > 0 if y_axis.log2 else True)

    drawn = [Series(s.name, sorted((p for p in s.points if usable(p)), key=lambda p: p.x), s.style) for s in series]
    drawn = [s for s in drawn if s.points]
    legend_w = 170
    left, right, top, bottom = 64, width - legend_w, 30, height - 46
    head = (
        f'<svg class="plot" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
        f'aria-label="{escape(title)}" xmlns="http://www.w3.org/2000/svg">'
        f'<text x="{left}" y="18" font-size="13" font-weight="bold">{escape(title)}</text>'
    )
    if not drawn:
        note = "no SAE here has this pair of metrics"
        return Markup(head + f'<text x="{left}" y="{(top + bottom) // 2}" font-size="12" fill="#666">{note}</text></svg>')
    xs = [math.log2(p.x) if x_axis.log2 else p.x for s in drawn for p in s.points]
    ys = [v for s in drawn for p in s.points for v in (p.y, p.y_min, p.y_max) if v is not None and math.isfinite(v)]
    if y_axis.log2:
        ys = [math.log2(v) for v in ys if v > 0]
    x0, x1, xticks = log2_ticks(2 ** min(xs), 2 ** max(xs)) if x_axis.log2 else linear_ticks(min(xs), max(xs))
    y0, y1, yticks = log2_ticks(2 ** min(ys), 2 ** max(ys)) if y_axis.log2 else linear_ticks(min(ys), max(ys))

    def sx(v: float) -> float:
        u = math.log2(v) if x_axis.log2 else v
        return left + (u - x0) / (x1 - x0) * (right - left)

    def sy(v: float) -> float:
        u = math.log2(v) if y_axis.log2 and v > 0 else v
        return bottom - (u - y0) / (y1 - y0) * (bottom - top)

    out = [head, f'<rect x="{left}" y="{top}" width="{right - left}" height="{bottom - top}" fill="#fbfcfe" stroke="#99a"/>']
    for t in xticks:
        px = left + (t - x0) / (x1 - x0) * (right - left)
        out.append(f'<line x1="{px:.1f}" y1="{top}" x2="{px:.1f}" y2="{bottom}" stroke="#e3e6ee"/>')
        out.append(f'<text x="{px:.1f}" y="{bottom + 15}" font-size="11" text-anchor="middle">{_tick_text(t, x_axis)}</text>')
    for t in yticks:
        py = bottom - (t - y0) / (y1 - y0) * (bottom - top)
        out.append(f'<line x1="{left}" y1="{py:.1f}" x2="{right}" y2="{py:.1f}" stroke="#e3e6ee"/>')
        out.append(f'<text x="{left - 5}" y="{py + 4:.1f}" font-size="11" text-anchor="end">{_tick_text(t, y_axis)}</text>')
    x_label = escape(x_axis.label)
    out.append(f'<text class="x-label" x="{(left + right) / 2:.0f}" y="{height - 8}" font-size="12" text-anchor="middle">{x_label}</text>')
    mid = (top + bottom) / 2
    out.append(
        f'<text class="y-label" x="14" y="{mid:.0f}" font-size="12" text-anchor="middle" '
        f'transform="rotate(-90 14 {mid:.0f})">{escape(y_axis.label)}</text>'
    )
    for s in drawn:
        colour = COLOURS[s.style % len(COLOURS)]
        pts = [(sx(p.x), sy(p.y)) for p in s.points]
        if len(pts) > 1:
            path = "".join(f"{'M' if i == 0 else 'L'}{x:.1f} {y:.1f}" for i, (x, y) in enumerate(pts))
            out.append(f'<path d="{path}" fill="none" stroke="{colour}" stroke-width="1.5" stroke-opacity="0.6"/>')
        for p, (px, py) in zip(s.points, pts):
            bar = ""
            if p.y_min is not None and p.y_max is not None and p.y_max > p.y_min:
                bar = (
                    f'<line x1="{px:.1f}" y1="{sy(p.y_min):.1f}" x2="{px:.1f}" y2="{sy(p.y_max):.1f}" stroke="{colour}" '
                    'stroke-width="1.5"/>'
                )
            mark = f"<title>{escape(p.label)}</title>{bar}{_marker(s.style, px, py, colour)}"
            out.append(f'<a class="point" href="{escape(p.href)}">{mark}</a>' if p.href else f'<g class="point">{mark}</g>')
    ly = top + 4
    for s in drawn:
        colour = COLOURS[s.style % len(COLOURS)]
        out.append(
            f'<g class="legend-entry">{_marker(s.style, right + 16, ly + 6, colour)}'
            f'<text x="{right + 28}" y="{ly + 10}" font-size="12">{escape(s.name)}</text></g>'
        )
        ly += 18
    out.append("</svg>")
    return Markup("".join(out))
