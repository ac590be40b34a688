"""A feature among its relatives across SAEs (sae_core/relations/families.py wrote them): its parent in a
narrower SAE, the finer features it splits into in a wider one, the same feature in SAEs of other seeds
(the stability badge), and the whole family as a tree.

Pages: the feature page loads `/saes/{sae}/features/{i}/relations` (a fragment) and links to
`/saes/{sae}/features/{i}/family`, the tree drawn as server-side SVG (no inline script or style: the
CSP refuses them). The API returns the same under /api/v1.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from fastapi import APIRouter, Path, Request
from fastapi.responses import Response
from markupsafe import Markup, escape
from sqlalchemy import Connection, select, tuple_

from sae_core.store.schema import SAE, Explanation, Feature, FeatureRelation, TokenFeature

from . import queries
from .deps import read_connection
from .render import VISIBLE, fmt, pct, templates

router = APIRouter(include_in_schema=False)
api_router = APIRouter(prefix="/api/v1", tags=["v1"])
SaeName = Path(description="the SAE's name (its URL slug)", max_length=200)
FeatureIndex = Path(description="feature (latent) index", ge=0, le=2**31 - 1)
MAX_CHILDREN = 12  # per node of the tree, the closest by cosine
MAX_DEPTH = 6  # SAE widths a tree spans at most
STRONGEST = 3  # strongest tokens shown per member


@dataclass
class Member:
    """One related feature: where it lives, what it is, and how it relates to the feature asked about."""

    sae: str
    index: int
    n_latents: int
    density: float | None = None
    explanation: str | None = None
    top_tokens: list[str] = field(default_factory=list)
    cosine: float | None = None  # to the feature it was reached from (its parent in a tree)
    coactivation: float | None = None  # P(parent | child) for a split, P(this | match) for a match
    co_fired: int | None = None
    children: list[Member] = field(default_factory=list)


def _relations(conn: Connection, kind: str, run_id: int, index: int, upward: bool) -> list[tuple]:
    """(other run, other feature, cosine, coactivation, co_fired) of `kind`; upward: the feature is the target."""
    R = FeatureRelation
    here, there = ((R.target_run_id, R.target_feature), (R.source_run_id, R.source_feature)) if upward else (
        (R.source_run_id, R.source_feature), (R.target_run_id, R.target_feature))  # fmt: skip
    rows = conn.execute(
        select(there[0], there[1], R.cosine, R.coactivation, R.co_fired)
        .join(SAE, SAE.active_run_id == there[0])  # only features of runs the pages show
        .where(R.kind == kind, here[0] == run_id, here[1] == index)
        .order_by(R.cosine.desc())
    ).all()
    return [tuple(r) for r in rows]


def _describe(conn: Connection, model_id: int, keys: list[tuple[int, int]]) -> dict[tuple[int, int], Member]:
    """Members for (run, feature) keys: SAE name and width, density, best explanation, strongest tokens."""
    if not keys:
        return {}
    vocab = queries.VOCAB.get(conn, model_id)
    pair = tuple_(Feature.run_id, Feature.index)
    out = {
        (r.run_id, r.feature_index): Member(r.name, r.feature_index, r.n_latents, r.density)
        for r in conn.execute(
            select(SAE.name, SAE.n_latents, Feature.run_id, Feature.index.label("feature_index"), Feature.density)
            .join(SAE, SAE.active_run_id == Feature.run_id)
            .where(pair.in_(keys))
        )
    }
    for run, index, text in conn.execute(
        select(Explanation.run_id, Explanation.feature_index, Explanation.text)
        .where(tuple_(Explanation.run_id, Explanation.feature_index).in_(keys))
        .order_by(Explanation.score.desc(), Explanation.method)
    ):
        if (run, index) in out and out[(run, index)].explanation is None:
            out[(run, index)].explanation = text
    for run, index, token in conn.execute(
        select(TokenFeature.run_id, TokenFeature.feature_index, TokenFeature.token_id)
        .where(tuple_(TokenFeature.run_id, TokenFeature.feature_index).in_(keys))
        .order_by(TokenFeature.n_examples.desc(), TokenFeature.max_act.desc())
    ):
        member = out.get((run, index))
        if member is not None and len(member.top_tokens) < STRONGEST:
            member.top_tokens.append(queries.token_text(vocab, token))
    return out


def _linked(conn: Connection, ref: queries.FeatureRef, rows: list[tuple]) -> list[Member]:
    found = _describe(conn, ref.model_id, [(r[0], r[1]) for r in rows])
    out = []
    for run, index, cosine, coactivation, co_fired in rows:
        if (run, index) in found:
            m = found[(run, index)]
            m.cosine, m.coactivation, m.co_fired = cosine, coactivation, co_fired
            out.append(m)
    return out


def _stability(conn: Connection, run_id: int, index: int, matches: list[Member]) -> dict | None:
    """In how many other SAEs of this width (those compared with this one) the feature has a match, and
    the lowest of its best cosines there; None when no SAE of another seed was compared."""
    R = FeatureRelation
    seeds = conn.execute(
        select(R.target_run_id)
        .join(SAE, SAE.active_run_id == R.target_run_id)
        .where(R.kind == "match", R.source_run_id == run_id)
        .distinct()
    ).all()
    if not seeds:
        return None
    best: dict[str, float] = {}
    for m in matches:
        best[m.sae] = max(best.get(m.sae, -1.0), m.cosine or 0.0)
    return {"seeds": len(seeds), "matched": len(best), "min_cosine": min(best.values()) if best else None}


def relations(conn: Connection, sae: str, index: int) -> dict:
    """Parents, children, matches and the stability badge of a feature (NotFound for an unknown one)."""
    ref = queries.feature_ref(conn, sae, index)
    assert ref.run_id is not None  # feature_ref raises for an unmined SAE
    parents = _linked(conn, ref, _relations(conn, "split", ref.run_id, index, upward=True))
    children = _linked(conn, ref, _relations(conn, "split", ref.run_id, index, upward=False))
    matches = _linked(conn, ref, _relations(conn, "match", ref.run_id, index, upward=False))
    return {
        "sae": sae,
        "index": index,
        "parents": [_flat(m) for m in parents],
        "children": [_flat(m) for m in children],
        "matches": [_flat(m) for m in matches],
        "stability": _stability(conn, ref.run_id, index, matches),
    }


def _flat(m: Member) -> dict:
    d = asdict(m)
    d.pop("children")
    return d


def family(conn: Connection, sae: str, index: int) -> dict:
    """The feature's family: up to the root by the closest parent, then every descendant (the closest
    MAX_CHILDREN per node). {"root": tree of Members, "focus": {"sae", "index"}}."""
    ref = queries.feature_ref(conn, sae, index)
    assert ref.run_id is not None
    run, feature = ref.run_id, index
    for _ in range(MAX_DEPTH):
        up = _relations(conn, "split", run, feature, upward=True)
        if not up:
            break
        run, feature = up[0][0], up[0][1]
    root_key = (run, feature)
    edges: dict[tuple[int, int], list[tuple]] = {}
    level, keys = [root_key], [root_key]
    for _ in range(MAX_DEPTH):
        following = []
        for key in level:
            down = _relations(conn, "split", key[0], key[1], upward=False)[:MAX_CHILDREN]
            edges[key] = down
            following += [(r[0], r[1]) for r in down if (r[0], r[1]) not in keys]
        keys += following
        level = following
        if not level:
            break
    found = _describe(conn, ref.model_id, keys)

    def build(key: tuple[int, int], rel: tuple | None) -> Member:
        m = found[key]
        if rel is not None:
            m.cosine, m.coactivation, m.co_fired = rel[2], rel[3], rel[4]
        m.children = [build((r[0], r[1]), r) for r in edges.get(key, []) if (r[0], r[1]) in found]
        return m

    return {"root": asdict(build(root_key, None)), "focus": {"sae": sae, "index": index}}


# ------------------------------------------------------------------------------------------------ drawing

NODE_W, NODE_H, GAP_X, GAP_Y, PAD = 150, 48, 16, 56, 12


def svg_token(text: str) -> Markup:
    """A token for SVG <text>: escaped, its whitespace as faint marks in <tspan>s. render.visible's <span> and
    <br> are HTML: inside an inline <svg> the HTML parser ends the SVG at them (the rest of the tree then
    spilled out as plain text after the first node whose token began with a space)."""
    if text == "":
        return Markup('<tspan class="ws">∅</tspan>')
    out = []
    for ch in text:
        if ch in VISIBLE:
            out.append(Markup('<tspan class="ws">{}</tspan>').format(VISIBLE[ch]))
        elif ord(ch) < 32 or 0x7F <= ord(ch) < 0xA0:
            out.append(Markup('<tspan class="ws">{}</tspan>').format(f"\\x{ord(ch):02x}"))
        else:
            out.append(escape(ch))
    return Markup("").join(out)


def tree_svg(root: dict, focus: dict) -> Markup:
    """The family as SVG: one row per SAE width (narrowest on top), each member a linked box with its
    strongest token, each edge labelled with its decoder cosine. Presentation attributes and classes
    only (static/style.css), no style attributes: the CSP allows no inline style."""
    slots: list[tuple[dict, int, float]] = []  # (node, depth, x centre)
    edges: list[tuple[float, int, float, int, float | None]] = []
    next_leaf = [0]

    def place(node: dict, depth: int) -> float:
        if node["children"]:
            xs = [place(c, depth + 1) for c in node["children"]]
            x = (xs[0] + xs[-1]) / 2
            for c, cx in zip(node["children"], xs):
                edges.append((x, depth, cx, depth + 1, c["cosine"]))
        else:
            x = PAD + next_leaf[0] * (NODE_W + GAP_X) + NODE_W / 2
            next_leaf[0] += 1
        slots.append((node, depth, x))
        return x

    place(root, 0)
    depth = max(d for _, d, _ in slots) + 1
    width = PAD * 2 + next_leaf[0] * (NODE_W + GAP_X) - GAP_X
    height = PAD * 2 + depth * NODE_H + (depth - 1) * GAP_Y

    def top(d: int) -> int:
        return PAD + d * (NODE_H + GAP_Y)

    out = [
        f'<svg class="family-tree" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
        'role="img" aria-label="feature family tree">'
    ]
    for x1, d1, x2, d2, cosine in edges:
        y1, y2 = top(d1) + NODE_H, top(d2)
        out.append(f'<line class="edge" x1="{x1:.0f}" y1="{y1}" x2="{x2:.0f}" y2="{y2}" stroke="#888" stroke-width="1.5"/>')
        out.append(
            f'<text class="edge-label" x="{(x1 + x2) / 2:.0f}" y="{(y1 + y2) / 2:.0f}" font-size="11" text-anchor="middle">'
            f"cos {fmt(cosine, 2)}</text>"
        )
    for node, d, x in slots:
        left, y = x - NODE_W / 2, top(d)
        here = node["sae"] == focus["sae"] and node["index"] == focus["index"]
        href = escape(f"/saes/{node['sae']}/features/{node['index']}")
        token = node["top_tokens"][0] if node["top_tokens"] else None
        label = escape(f"{node['sae']} #{node['index']}")
        # The box names the width, which tells the rows apart; the SAE's full name (too long for the box) is in the tooltip.
        short = escape(f"{node['n_latents']:,} latents #{node['index']}")
        if token is not None and len(token) > 12:
            token = token[:11] + "…"
        out.append(
            f'<a href="{href}" class="family-node{" focus" if here else ""}">'
            f"<title>{label}: {escape(node['explanation'] or 'no explanation')}</title>"
            f'<rect x="{left:.0f}" y="{y}" width="{NODE_W}" height="{NODE_H}" rx="6" fill="{"#fff4d6" if here else "#f4f6fa"}" '
            f'stroke="{"#c80" if here else "#99a"}"/>'
            f'<text x="{x:.0f}" y="{y + 18}" font-size="12" text-anchor="middle">{short}</text>'
            f'<text x="{x:.0f}" y="{y + 36}" font-size="12" text-anchor="middle">{svg_token(token) if token is not None else "–"}'
            f" · {pct(node['density'], 3)}</text></a>"
        )
    out.append("</svg>")
    return Markup("".join(out))


def members(root: dict) -> list[dict]:
    """The tree's members, narrowest SAE first (breadth first)."""
    out, level = [], [root]
    while level:
        out += level
        level = [c for m in level for c in m["children"]]
    return out


# ------------------------------------------------------------------------------------------------ routes


@router.get("/saes/{sae}/features/{index}/relations")
async def relations_fragment(request: Request, sae: str = SaeName, index: int = FeatureIndex) -> Response:
    def render(conn: Connection) -> Response:
        ctx = {"r": relations(conn, sae, index), "base": f"/saes/{sae}"}
        return templates.TemplateResponse(request, "_relations.html", ctx)

    return await read_connection(request, render)


@router.get("/saes/{sae}/features/{index}/family")
async def family_page(request: Request, sae: str = SaeName, index: int = FeatureIndex) -> Response:
    def render(conn: Connection) -> Response:
        tree = family(conn, sae, index)
        ctx = {"sae": sae, "index": index, "tree": tree, "svg": tree_svg(tree["root"], tree["focus"]), "members": members(tree["root"])}
        return templates.TemplateResponse(request, "family.html", ctx)

    return await read_connection(request, render)


NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"description": "No such SAE or feature, or the SAE has not been mined yet"}}


@api_router.get(
    "/saes/{sae}/features/{index}/relations", summary="A feature's parents, children and matches across SAEs", responses=NOT_FOUND
)
async def relations_api(request: Request, sae: str = SaeName, index: int = FeatureIndex) -> dict:
    """Parents (narrower SAEs), children (wider SAEs) and matches (same width, other seeds), each with its
    decoder cosine and co-activation, and the stability badge (`saescope family` builds them)."""
    return await read_connection(request, relations, sae, index)


@api_router.get("/saes/{sae}/features/{index}/family", summary="A feature's family tree across SAE widths", responses=NOT_FOUND)
async def family_api(request: Request, sae: str = SaeName, index: int = FeatureIndex) -> dict:
    """The tree from the feature's root ancestor down: each member's SAE, index, density, explanation,
    strongest tokens and its cosine and co-activation with its parent."""
    return await read_connection(request, family, sae, index)
