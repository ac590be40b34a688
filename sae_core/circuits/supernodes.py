"""Suggested supernodes: groups of an attribution graph's feature nodes that likely stand for one thing (issue 29 item 3).

circuit-tracer's users merge nodes into supernodes by hand; this proposes the groups for them to accept or edit. Two
feature nodes are linked when they sit at the same or nearby token positions (`max_pos_gap`) and

- their explanations say the same thing: normalised texts equal, or token-set Jaccard >= `explanation_jaccard`;
- their decoders point the same way: cosine of the W_dec rows >= `decoder_cosine`, same layer only. A transcoder's
  decoder writes the MLP output of its own layer; two layers' transcoders are trained apart, so a shared direction
  across layers says less about a shared meaning than one inside a dictionary, where training pushes rows apart.
  The same feature at two positions counts as cosine 1 (no weights needed);
- they co-fire: the mined co-activation table's Jaccard (co-fired / fired by either) >= `cofire_jaccard`, same layer
  (the table is per mining run).

A suggestion is a connected group of links (union-find), with its members, a label (the explanation most members
share, else their most common strongest token) and every link's reason and number. Plain data in and out: the app
(app/graph_groups.py) gathers explanations, decoder rows and co-activation from the store.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from ..errors import SaescopeError


@dataclass(frozen=True)
class SupernodeConfig:
    explanation_jaccard: float = 0.6  # token-set Jaccard of two normalised explanations
    decoder_cosine: float = 0.6  # cosine of two decoder rows of one layer
    cofire_jaccard: float = 0.3  # co-fired / fired by either, from the mined co-activation table
    max_pos_gap: int = 1  # same or adjacent token positions
    max_suggestions: int = 50

    def __post_init__(self) -> None:
        for name in ("explanation_jaccard", "decoder_cosine", "cofire_jaccard"):
            value = getattr(self, name)
            if not 0.0 < value <= 1.0:
                raise SaescopeError(f"{name} must be in (0, 1], got {value}")
        if self.max_pos_gap < 0:
            raise SaescopeError(f"max_pos_gap must be >= 0, got {self.max_pos_gap}")
        if self.max_suggestions < 1:
            raise SaescopeError(f"max_suggestions must be >= 1, got {self.max_suggestions}")


@dataclass(frozen=True)
class FeatureNode:
    id: int  # the graph's node id
    layer: int
    pos: int
    feature: int  # index in its layer's transcoder
    influence: float = 0.0
    explanation: str | None = None
    top_token: str | None = None


@dataclass(frozen=True)
class Reason:
    kind: str  # "explanation", "decoder" or "cofire"
    source: int  # node ids of the linked pair
    target: int
    value: float  # the Jaccard or cosine that linked them


@dataclass
class Suggestion:
    members: list[int]  # node ids, strongest influence first
    label: str
    reasons: list[Reason] = field(default_factory=list)
    influence: float = 0.0  # the members' summed influence (the order of the suggestions)


_WORD = re.compile(r"[a-z0-9]+")


def normalise(text: str) -> str:
    """Lower case, punctuation and repeated spaces gone: 'Mentions of a Cat.' and 'mentions of a cat' are equal."""
    return " ".join(_WORD.findall(text.lower()))


def text_jaccard(a: str, b: str) -> float:
    sa, sb = set(normalise(a).split()), set(normalise(b).split())
    if not sa or not sb:
        return 0.0
    return len(sa & sb) / len(sa | sb)


def _unit_rows(decoders: dict[int, dict[int, np.ndarray]]) -> dict[int, dict[int, np.ndarray]]:
    out: dict[int, dict[int, np.ndarray]] = {}
    for layer, rows in decoders.items():
        out[layer] = {}
        for index, row in rows.items():
            v = np.asarray(row, dtype=np.float64).ravel()
            norm = float(np.linalg.norm(v))
            if norm > 0:
                out[layer][index] = v / norm
    return out


def _links(
    a: FeatureNode,
    b: FeatureNode,
    cfg: SupernodeConfig,
    unit: dict[int, dict[int, np.ndarray]],
    cofire: dict[int, dict[int, dict[int, float]]],
) -> list[Reason]:
    found = []
    if a.explanation and b.explanation:
        same = normalise(a.explanation) == normalise(b.explanation) and normalise(a.explanation) != ""
        j = 1.0 if same else text_jaccard(a.explanation, b.explanation)
        if j >= cfg.explanation_jaccard:
            found.append(Reason("explanation", a.id, b.id, round(j, 4)))
    if a.layer == b.layer:
        if a.feature == b.feature:
            found.append(Reason("decoder", a.id, b.id, 1.0))
        else:
            rows = unit.get(a.layer, {})
            if a.feature in rows and b.feature in rows:
                cos = float(rows[a.feature] @ rows[b.feature])
                if cos >= cfg.decoder_cosine:
                    found.append(Reason("decoder", a.id, b.id, round(cos, 4)))
        table = cofire.get(a.layer, {})
        j = max(table.get(a.feature, {}).get(b.feature, 0.0), table.get(b.feature, {}).get(a.feature, 0.0))
        if a.feature != b.feature and j >= cfg.cofire_jaccard:
            found.append(Reason("cofire", a.id, b.id, round(float(j), 4)))
    return found


def _label(members: list[FeatureNode]) -> str:
    texts = Counter(normalise(m.explanation) for m in members if m.explanation and normalise(m.explanation))
    if texts:
        best, _ = texts.most_common(1)[0]
        # the original wording of the strongest member that says it
        return next(m.explanation for m in members if m.explanation and normalise(m.explanation) == best)
    tokens = Counter(m.top_token for m in members if m.top_token)
    if tokens:
        return f"fires on {tokens.most_common(1)[0][0]!r}"
    layers = sorted({m.layer for m in members})
    features = sorted({m.feature for m in members})
    return f"L{'/'.join(map(str, layers))} #{'/'.join(map(str, features))}"


def suggest(
    nodes: list[FeatureNode],
    cfg: SupernodeConfig | None = None,
    decoders: dict[int, dict[int, np.ndarray]] | None = None,
    cofire: dict[int, dict[int, dict[int, float]]] | None = None,
) -> list[Suggestion]:
    """Groups of `nodes` to merge. `decoders`: layer -> feature index -> W_dec row (layers without weights
    are left out); `cofire`: layer -> feature -> partner -> co-activation Jaccard (mined layers only)."""
    cfg = cfg or SupernodeConfig()
    unit = _unit_rows(decoders or {})
    table = cofire or {}
    by_id = {n.id: n for n in nodes}
    if len(by_id) != len(nodes):
        raise SaescopeError("feature node ids must be unique")
    parent = {n.id: n.id for n in nodes}

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    reasons: list[Reason] = []
    ordered = sorted(nodes, key=lambda n: (n.pos, n.layer, n.id))
    for i, a in enumerate(ordered):
        for b in ordered[i + 1 :]:
            if b.pos - a.pos > cfg.max_pos_gap:
                break  # sorted by position: no later node is near enough
            found = _links(a, b, cfg, unit, table)
            if found:
                reasons.extend(found)
                parent[root(a.id)] = root(b.id)
    groups: dict[int, list[FeatureNode]] = {}
    for n in nodes:
        groups.setdefault(root(n.id), []).append(n)
    out = []
    for members in groups.values():
        if len(members) < 2:
            continue
        members.sort(key=lambda n: (-n.influence, n.id))
        ids = {m.id for m in members}
        mine = [r for r in reasons if r.source in ids]
        out.append(Suggestion([m.id for m in members], _label(members), mine, sum(m.influence for m in members)))
    out.sort(key=lambda s: (-s.influence, s.members[0]))
    return out[: cfg.max_suggestions]
