"""Jinja2 set-up and the small renderers the templates use: visible, escaped tokens; activation
highlighting; the histogram as inline SVG. Token text is untrusted: it only reaches HTML through
`markupsafe.escape` here (and Jinja's autoescape everywhere else)."""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path

from fastapi.templating import Jinja2Templates
from jinja2 import Environment, FileSystemLoader
from markupsafe import Markup, escape

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"
# auto_reload off: templates ship with the code, and checking their mtimes cost a stat per template per page
templates = Jinja2Templates(env=Environment(loader=FileSystemLoader(TEMPLATES), autoescape=True, auto_reload=False))

# whitespace drawn as a visible glyph (the real character stays in the tooltip's repr)
VISIBLE = {" ": "·", "\n": "↵", "\t": "→", "\r": "␍", "\u00a0": "⍽"}


@lru_cache(maxsize=65536)  # a pure function of the token text, called ~300 times per feature page
def visible(text: str) -> Markup:
    """Escape a token and show its whitespace: spaces as faint dots, newlines as ↵ plus a line break."""
    if text == "":
        return Markup('<span class="ws">∅</span>')
    out = []
    for ch in text:
        if ch in VISIBLE:
            out.append(Markup('<span class="ws">{}</span>').format(VISIBLE[ch]))
            if ch == "\n":
                out.append(Markup("<br>"))
        elif ord(ch) < 32 or 0x7F <= ord(ch) < 0xA0:
            out.append(Markup('<span class="ws">{}</span>').format(f"\\x{ord(ch):02x}"))
        else:
            out.append(escape(ch))
    return Markup("").join(out)


HEAT_LEVELS = 20  # highlight steps; static/style.css defines .tok.h1 .. .tok.h20


def heat(value: float, max_value: float) -> str:
    """The highlight class of a token whose activation is `value` on a feature whose max is `max_value`:
    a class rather than an inline style, so the Content-Security-Policy can refuse inline styles."""
    if value <= 0 or max_value <= 0:
        return ""
    return f"h{max(1, min(HEAT_LEVELS, math.ceil(HEAT_LEVELS * value / max_value)))}"


@lru_cache(maxsize=65536)  # per-token tooltips format float16 values: few distinct ones
def fmt(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if value == 0:
        return "0"
    if abs(value) >= 1000 or abs(value) < 10**-(digits):
        return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:,.0f}"
    return f"{value:.{digits}f}".rstrip("0").rstrip(".")


def pct(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{100 * value:.{digits}f}%"


@lru_cache(maxsize=65536)
def _token_repr(text: str) -> str:
    return str(escape(repr(text)))


def context_html(ex: dict, max_value: float) -> Markup:
    """One context (an example dict of queries.examples): each token escaped with visible whitespace,
    highlighted by its activation, the peak outlined; the tooltip gives the value, token id and the
    token's repr. Python rather than a Jinja macro: a page draws 320-1,600 tokens, and the macro was
    half its cost."""
    doc_id, peak = ex["doc_id"], ex["max_pos"]
    doc = escape(doc_id)
    short = escape(doc_id if len(doc_id) <= 23 else doc_id[:17] + "…")
    parts = [
        f'<div class="context" data-doc="{doc}"><span class="meta" title="document {doc}, token {ex["doc_offset"]}">'
        f"{fmt(ex['max_act'])} · {short}</span>"
    ]
    for i, (tok, token_id, a) in enumerate(zip(ex["tokens"], ex["token_ids"], ex["acts"])):
        cls = "tok peak" if i == peak else "tok"
        if a > 0:
            cls += " " + heat(a, max_value)
        parts.append(f'<span class="{cls}" title="{fmt(a, 4)} · token {token_id} {_token_repr(tok)}">{visible(tok)}</span>')
    parts.append("</div>")
    return Markup("".join(parts))


def histogram_svg(edges: list[float], counts: list[int], width: int = 560, height: int = 200) -> Markup:
    """Bar chart of counts on a log y axis, with labelled axes; bars carry their range and count as a tooltip."""
    left, bottom, top, right = 52, 36, 10, 10
    plot_w, plot_h = width - left - right, height - top - bottom
    peak = max(counts) if counts else 0
    if peak == 0:
        return Markup(
            f'<svg class="hist" role="img" aria-label="no activations" width="{width}" height="{height}">'
            f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle">never fired</text></svg>'
        )
    log_peak = math.log10(peak + 1)
    bar_w = plot_w / len(counts)
    parts = [
        f'<svg class="hist" role="img" aria-label="activation histogram" viewBox="0 0 {width} {height}" width="{width}" height="{height}">'
    ]
    for i, c in enumerate(counts):
        if c == 0:
            continue
        h = plot_h * math.log10(c + 1) / log_peak
        x, y = left + i * bar_w, top + plot_h - h
        parts.append(
            f'<rect class="bar" x="{x:.1f}" y="{y:.1f}" width="{max(bar_w - 1, 1):.1f}" height="{h:.1f}">'
            f"<title>{fmt(edges[i])} – {fmt(edges[i + 1])}: {c:,}</title></rect>"
        )
    axis_y = top + plot_h
    parts.append(f'<line class="axis" x1="{left}" y1="{axis_y}" x2="{left + plot_w}" y2="{axis_y}"/>')
    parts.append(f'<line class="axis" x1="{left}" y1="{top}" x2="{left}" y2="{axis_y}"/>')
    for frac in (0, 0.5, 1):
        value = edges[0] + frac * (edges[-1] - edges[0])
        parts.append(f'<text class="tick" x="{left + frac * plot_w:.1f}" y="{axis_y + 14}" text-anchor="middle">{fmt(value)}</text>')
    for c in sorted({1, peak} | ({10 ** int(math.log10(peak))} if peak >= 10 else set())):
        y = top + plot_h - plot_h * math.log10(c + 1) / log_peak
        parts.append(f'<text class="tick" x="{left - 4}" y="{y + 4:.1f}" text-anchor="end">{c:,}</text>')
    parts.append(f'<text class="label" x="{left + plot_w / 2}" y="{height - 4}" text-anchor="middle">activation</text>')
    mid = top + plot_h / 2
    parts.append(f'<text class="label" x="12" y="{mid}" text-anchor="middle" transform="rotate(-90 12 {mid})">count (log)</text>')
    parts.append("</svg>")
    return Markup("".join(parts))


templates.env.filters.update(visible=visible, fmt=fmt, pct=pct)
templates.env.globals.update(heat=heat, histogram_svg=histogram_svg, context=context_html)
