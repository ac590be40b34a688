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


def fmt(value: float | None, digits: int = 3) -> str:
    """A number as the pages print it: `digits` decimals without trailing zeros, thousands separators
    from 1,000, significant digits below 10^-digits, "–" for a missing value. Its output is digits,
    signs, '.', ',', 'e' or "–": safe in HTML as it is."""
    if value is None or value != value:  # None or NaN
        return "–"
    if value == 0:
        return "0"
    size = abs(value)
    if size >= 1000:
        return f"{value:,.0f}"
    if size < 10**-digits:
        return f"{value:.{digits}g}"
    return f"{value:.{digits}f}".rstrip("0").rstrip(".")


@lru_cache(maxsize=65536)
def _act_text(value: float) -> str:
    """A context token's activation for its tooltip. Activations are stored as float16 (store/codec.py),
    so there are few distinct values and they are cached; `fmt` is not, because histogram edges and
    statistics are nearly all distinct and would evict these."""
    return fmt(value, 4)


def pct(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{100 * value:.{digits}f}%"


@lru_cache(maxsize=65536)
def _token_repr(text: str) -> str:
    return str(escape(repr(text)))


@lru_cache(maxsize=65536)
def tok(text: str) -> Markup:
    """A token as the pages show it outside contexts (the `tok` filter): its visible text in a span."""
    return Markup(f'<span class="tok">{visible(text)}</span>')


def _quiet_token(text: str, token_id: int) -> str:
    """A context token where the feature is zero: a pure function of the token."""
    return f'<span class="tok" title="0 · token {token_id} {_token_repr(text)}">{visible(text)}</span>'


class QuietTokens:
    """Per vocabulary, each token's `_quiet_token` span, built the first time the token is drawn. Nearly
    every token of a context is quiet (1.5 of 64 fire on the demo's features), and a list lookup by
    token id cost a tenth of a cached call: the contexts were a third of a page's rendering."""

    def __init__(self) -> None:
        self._by_vocab: dict[int, tuple[list[str], list[str | None]]] = {}

    def spans(self, vocab: list[str], texts: list[str], ids: list[int]) -> list[str]:
        """The quiet spans of a context's tokens (`texts` their strings in `vocab`, `ids` their ids)."""
        entry = self._by_vocab.get(id(vocab))
        if entry is None or entry[0] is not vocab:  # holding the vocabulary keeps its id from being reused
            entry = self._by_vocab[id(vocab)] = (vocab, [None] * len(vocab))
        table = entry[1]
        if ids and not (0 <= min(ids) and max(ids) < len(table)):  # an id the vocabulary lacks: not tabled
            return [_quiet_token(t, i) for t, i in zip(texts, ids)]
        out = [table[i] for i in ids]
        if None in out:  # tokens drawn for the first time
            for j, span in enumerate(out):
                if span is None:
                    out[j] = table[ids[j]] = _quiet_token(texts[j], ids[j])
        return out  # type: ignore[return-value]  # no None left


QUIET = QuietTokens()


def context_html(ex: dict, max_value: float, vocab: list[str]) -> Markup:
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
    texts, ids, acts = ex["tokens"], ex["token_ids"], ex["acts"]
    spans = QUIET.spans(vocab, texts, ids)  # then the few tokens that fire, and the peak
    for i in {peak, *[i for i, a in enumerate(acts) if a != 0]}:
        if not 0 <= i < len(spans):
            continue
        a = acts[i]
        cls = "tok peak" if i == peak else "tok"
        if a > 0:
            cls += " " + heat(a, max_value)
        spans[i] = f'<span class="{cls}" title="{_act_text(a)} · token {ids[i]} {_token_repr(texts[i])}">{visible(texts[i])}</span>'
    parts += spans
    parts.append("</div>")
    return Markup("".join(parts))


def token_value_rows(rows: list, value_class: str) -> Markup:
    """Table rows of (token, value) pairs (schemas.TokenValue): the logit effects."""
    return Markup("".join(f'<tr><td>{tok(t.token)}</td><td class="num {value_class}">{fmt(t.value, 2)}</td></tr>' for t in rows))


def neighbour_rows(neighbours: list, base: str) -> Markup:
    """Table rows of nearest features (schemas.Neighbour): a link, the cosine and the strongest token.
    Python like context_html: as a Jinja loop, these two tables cost as much as the ten contexts."""
    base = escape(base)
    never = Markup('<span class="muted">never fired</span>')
    return Markup(
        "".join(
            f'<tr><td><a class="neighbour" href="{base}/features/{n.index}">#{n.index}</a></td><td class="num">{fmt(n.cosine)}</td>'
            f"<td>{never if n.top_token is None else tok(n.top_token)}</td></tr>"
            for n in neighbours
        )
    )


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
    bars = [(i, c) for i, c in enumerate(counts) if c]
    labels = {i: fmt(edges[i]) for j, _ in bars for i in (j, j + 1)}  # each inner edge bounds two bars
    width_attr = f'width="{max(bar_w - 1, 1):.1f}"'
    scale = plot_h / log_peak
    for i, c in bars:
        h = scale * math.log10(c + 1)
        parts.append(
            f'<rect class="bar" x="{left + i * bar_w:.1f}" y="{top + plot_h - h:.1f}" {width_attr} height="{h:.1f}">'
            f"<title>{labels[i]} – {labels[i + 1]}: {c:,}</title></rect>"
        )
    axis_y = top + plot_h
    parts.append(f'<line class="axis" x1="{left}" y1="{axis_y}" x2="{left + plot_w}" y2="{axis_y}"/>')
    parts.append(f'<line class="axis" x1="{left}" y1="{top}" x2="{left}" y2="{axis_y}"/>')
    for frac, anchor in ((0, "middle"), (0.5, "middle"), (1, "end")):  # the last label ends at the axis: not cut off
        value = edges[0] + frac * (edges[-1] - edges[0])
        parts.append(f'<text class="tick" x="{left + frac * plot_w:.1f}" y="{axis_y + 14}" text-anchor="{anchor}">{fmt(value)}</text>')
    for c in sorted({1, peak} | ({10 ** int(math.log10(peak))} if peak >= 10 else set())):
        y = top + plot_h - plot_h * math.log10(c + 1) / log_peak
        parts.append(f'<text class="tick" x="{left - 4}" y="{y + 4:.1f}" text-anchor="end">{c:,}</text>')
    parts.append(f'<text class="label" x="{left + plot_w / 2}" y="{height - 4}" text-anchor="middle">activation</text>')
    mid = top + plot_h / 2
    parts.append(f'<text class="label" x="12" y="{mid}" text-anchor="middle" transform="rotate(-90 12 {mid})">count (log)</text>')
    parts.append("</svg>")
    return Markup("".join(parts))


templates.env.filters.update(visible=visible, fmt=fmt, pct=pct, tok=tok)  # filters: Jinja calls them directly, globals through Context.call
templates.env.globals.update(
    heat=heat, histogram_svg=histogram_svg, context=context_html, token_value_rows=token_value_rows, neighbour_rows=neighbour_rows
)
