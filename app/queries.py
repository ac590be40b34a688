"""Read-side queries shared by the HTML pages and the REST API. Every function takes the request's
Connection (app/deps.py): one transaction, hence one snapshot, so a page never mixes two mining runs.
Statements are SQLAlchemy Core selects over the store's tables; rows are read as rows, never as ORM
objects (creating a Session per request cost as much as the hot paths' one query)."""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterable
from typing import Literal, NamedTuple

from sqlalchemy import ColumnElement, Connection, Engine, Integer, Row, SQLColumnExpression, bindparam, func, select

from sae_core.errors import NotFound as NotFound  # raised here; app/families.py and app/feature_map.py too
from sae_core.store import codec, order
from sae_core.store.schema import SAE, Example, Explanation, Feature, FeatureOrder, MiningRun, Model, TokenFeature, Vocab

from . import explanations, schemas
from . import meaning_search as search_by_meaning
from .prepared import Prepared, json_value

RARE_DENSITY = order.RARE_DENSITY
SortKey = Literal["index", "density", "max_act", "explanation"]  # explanation: its N2G score
Filter = order.Filter


class VocabCache:
    """Token strings per model, loaded once per process (49k strings for SmolLM2)."""

    def __init__(self) -> None:
        self._by_model: dict[tuple[Engine, int], list[str]] = {}
        self._lowered: dict[tuple[Engine, int], list[str]] = {}
        self._lock = threading.Lock()

    def get(self, conn: Connection, model_id: int) -> list[str]:
        key = (conn.engine, model_id)  # one process may serve several stores (tests do)
        if key not in self._by_model:
            with self._lock:
                if key not in self._by_model:
                    rows = conn.execute(select(Vocab.token_id, Vocab.text).where(Vocab.model_id == model_id).order_by(Vocab.token_id)).all()
                    texts = [""] * (rows[-1][0] + 1 if rows else 0)
                    for tid, txt in rows:
                        texts[tid] = txt
                    self._by_model[key] = texts
                    if gc.get_freeze_count():  # a server worker (app.server._AppFactory): long-lived objects out of the collector's way
                        gc.freeze()
        return self._by_model[key]

    def lowered(self, conn: Connection, model_id: int) -> list[str]:
        """The token strings in lower case, for search (lowering 49k strings per query was most of its time)."""
        key = (conn.engine, model_id)
        if key not in self._lowered:
            self._lowered[key] = [t.lower() for t in self.get(conn, model_id)]
        return self._lowered[key]


VOCAB = VocabCache()


def token_text(vocab: list[str], token_id: int) -> str:
    return vocab[token_id] if 0 <= token_id < len(vocab) else f"<{token_id}>"


def token_or_none(vocab: list[str], token_id: int | None) -> str | None:
    """token_text, or None where the store has no token (a feature that never fired)."""
    return None if token_id is None else token_text(vocab, token_id)


def token_texts(vocab: list[str], ids: list[int]) -> list[str]:
    if ids and 0 <= min(ids) and max(ids) < len(vocab):
        return [vocab[t] for t in ids]  # the common case, without a call per token
    return [token_text(vocab, t) for t in ids]


# An SAE with its live mining run's columns (run_*: None when it has none) and its model's name.
_SAE_ROW = (
    select(
        SAE.__table__,
        Model.name.label("model_name"),
        MiningRun.id.label("run_id"),
        MiningRun.corpus.label("run_corpus"),
        MiningRun.tokens.label("run_tokens"),
        MiningRun.finished_at.label("run_finished_at"),
        MiningRun.config.label("run_config"),
    )
    .join(Model, SAE.model_id == Model.id)
    .outerjoin(MiningRun, SAE.active_run_id == MiningRun.id)
)


def _summary(sae: Row, alive: int | None) -> dict:
    """SAESummary's fields from a _SAE_ROW row."""
    return dict(
        name=sae.name,
        model=sae.model_name,
        hook=sae.hook,
        architecture=sae.architecture,
        d_in=sae.d_in,
        n_latents=sae.n_latents,
        k=sae.k,
        metrics=sae.metrics or {},
        mined_tokens=sae.run_tokens,
        alive=alive,
    )


_ALIVE: dict[tuple[Engine, int], int | None] = {}  # runs never change once complete, so their counts can be cached


def _alive(conn: Connection, run_id: int | None) -> int | None:
    """Features of a mining run that fired at least once (stored with the run's checkpoints; older runs:
    a count, once per process)."""
    if run_id is None:
        return None
    key = (conn.engine, run_id)
    if key not in _ALIVE:
        first = conn.execute(_CHECKPOINT, {"run_id": run_id, "sort": "index", "filter": "alive", "position": 0}).first()
        _ALIVE[key] = first.total if first else conn.scalar(select(func.count()).select_from(Feature).where(*_filtered(run_id, "alive")))
    return _ALIVE[key]


def list_models(conn: Connection) -> list[schemas.ModelSummary]:
    saes: dict[int, list[schemas.SAESummary]] = {}
    for sae in conn.execute(_SAE_ROW.order_by(SAE.name)):
        saes.setdefault(sae.model_id, []).append(schemas.SAESummary(**_summary(sae, _alive(conn, sae.run_id))))
    return [
        schemas.ModelSummary(
            name=model.name, d_model=model.d_model, n_layers=model.n_layers, vocab_size=model.vocab_size, saes=saes.get(model.id, [])
        )
        for model in conn.execute(select(Model.id, Model.name, Model.d_model, Model.n_layers, Model.vocab_size).order_by(Model.name))
    ]


def get_sae(conn: Connection, name: str) -> Row:
    """The SAE's row with its live run's columns (run_id, run_tokens, ...: None when unmined) and its model's name."""
    row = conn.execute(_SAE_ROW.where(SAE.name == name)).first()
    if row is None:
        raise NotFound(f"no SAE named {name!r}")
    return row


def sae_detail(conn: Connection, name: str) -> schemas.SAEDetail:
    sae = get_sae(conn, name)
    mining = (
        {
            "run_id": sae.run_id,
            "corpus": sae.run_corpus,
            "tokens": sae.run_tokens,
            "finished_at": sae.run_finished_at.isoformat() if sae.run_finished_at else None,
            "config": sae.run_config,
        }
        if sae.run_id is not None
        else None
    )
    return schemas.SAEDetail(
        **_summary(sae, _alive(conn, sae.run_id)), train_config=sae.train_config or {}, mining=mining, benchmarks=_benchmarks(conn, name)
    )


def _benchmarks(conn: Connection, name: str) -> list[dict]:
    """The SAE's bench-sae results (sae_core/store/benchmarks.py), one per seed, for the SAE page and its API."""
    from sae_core.store.benchmarks import read_benchmarks

    out = []
    for row in read_benchmarks(conn, name):
        results = dict(row.results)
        valid, details = results.pop("absorption_valid", None), results.pop("details", {})
        out.append(
            {
                "seed": row.seed,
                "suite_version": row.suite_version,
                "computed_at": row.computed_at.isoformat() if row.computed_at else None,
                "metrics": {k: v for k, v in results.items() if isinstance(v, (int, float)) and not isinstance(v, bool)},
                "absorption_valid": valid,
                "absorption_note": (details.get("absorption") or {}).get("skipped"),
                "details": details,
            }
        )
    return out


def _filtered(run_id: int, flt: Filter, sort: str = "density", lower_bound: bool = True) -> list[ColumnElement[bool]]:
    """The filter in terms of density, as store/order.py's checkpoints define it (n_fired > 0 exactly
    when density > 0). Sorted by density, or listing dead features (density = 0, by index), the
    density index serves both filter and order; sorted otherwise, the filter is written `density + 0`
    so that no planner picks the density index and then sorts every match (SQLite sorted 560k rare
    features by max_act for each page: 6 s), but walks the sort's own index, filtering as it goes.
    `lower_bound=False` leaves out `density > 0` where a checkpoint start inside the filter implies it
    (SQLite seeks on one lower bound of a column only, and picked that one: a walk from the start)."""
    cond = [Feature.run_id == run_id]
    if flt == "all":
        return cond
    density = Feature.density if sort == "density" or (flt == "dead" and sort == "index") else Feature.density + 0
    if flt in ("alive", "rare") and (lower_bound or sort != "density"):
        cond.append(density > 0)
    if flt == "dead":
        cond.append(density == 0)
    elif flt == "rare":
        cond.append(density < order.RARE_DENSITY)
    return cond


def _from(column: SQLColumnExpression[float], value: float, index: int) -> ColumnElement[bool]:
    """Rows at or after (value, index) in (column, index) order, written so that planners seek the
    index to `column >= value` (SQLite did not seek on the row value `(column, index) >= (...)` once
    the filter also bounded the column, and walked from the filter's start instead)."""
    return (column >= value) & ((column > value) | (Feature.index >= index))


_TABLE_COLUMNS = (Feature.index, Feature.density, Feature.max_act, Feature.mean_act, Feature.n_fired, Feature.top_token_id)
_SORT_COLUMNS = {"index": Feature.index, "density": Feature.density, "max_act": Feature.max_act}
_CHECKPOINT = (
    select(FeatureOrder.position, FeatureOrder.feature_index, FeatureOrder.value, FeatureOrder.total)
    .where(
        FeatureOrder.run_id == bindparam("run_id"),
        FeatureOrder.sort == bindparam("sort"),
        FeatureOrder.filter == bindparam("filter"),
        FeatureOrder.position <= bindparam("position"),
    )
    .order_by(FeatureOrder.position.desc())
    .limit(1)
)


def _table_rows(conn: Connection, run_id: int, offset: int, limit: int, sort: SortKey, desc: bool, flt: Filter) -> tuple[int, list]:
    """(rows in the filter, the page's rows): from the run's checkpoints when it has them (any page in
    a few index lookups), else by OFFSET and a count (runs mined before checkpoints existed)."""
    if sort == "explanation":  # by N2G score, unexplained features last (app/explanations.py; no checkpoints)
        return explanations.table_rows(conn, _filtered(run_id, flt), _TABLE_COLUMNS, offset, limit, desc)
    params = {"run_id": run_id, "sort": sort, "filter": flt}
    first = conn.execute(_CHECKPOINT, {**params, "position": 0}).first() if sort in order.SORTS else None
    cond, column = _filtered(run_id, flt, sort), _SORT_COLUMNS[sort]
    if first is None:
        total = conn.scalar(select(func.count()).select_from(Feature).where(*cond)) or 0
        ordering = (column.desc(), Feature.index.desc()) if desc else (column.asc(), Feature.index.asc())
        return total, list(conn.execute(select(*_TABLE_COLUMNS).where(*cond).order_by(*ordering).offset(offset).limit(limit)))
    total = first.total
    plan = order.page_plan(total, offset, limit, desc)
    if plan.take == 0:
        return total, []
    cp = first if plan.start < order.EVERY else conn.execute(_CHECKPOINT, {**params, "position": plan.start}).first()
    assert cp is not None  # position 0 exists, so every position has a checkpoint at or before it
    start = Feature.index >= cp.feature_index if sort == "index" else _from(column, cp.value, cp.feature_index)
    cond = _filtered(run_id, flt, sort, lower_bound=False)  # the start is inside the filter
    rows = list(
        conn.execute(
            select(*_TABLE_COLUMNS).where(*cond, start).order_by(column, Feature.index).offset(plan.start - cp.position).limit(plan.take)
        )
    )
    return total, rows[::-1] if plan.reverse else rows


def feature_page(
    conn: Connection, name: str, offset: int, limit: int, sort: SortKey, order_: Literal["asc", "desc"], flt: Filter
) -> schemas.FeaturePage:
    sae = get_sae(conn, name)
    if sae.run_id is None:
        return schemas.FeaturePage(sae=name, total=0, offset=offset, limit=limit, features=[])
    total, rows = _table_rows(conn, sae.run_id, offset, limit, sort, order_ == "desc", flt)
    vocab = VOCAB.get(conn, sae.model_id)
    explained = explanations.for_table(conn, sae.run_id, [r[0] for r in rows])
    feats = [
        schemas.FeatureSummary(
            index=i,
            density=density,
            max_act=max_act,
            mean_act=mean_act,
            n_fired=n_fired,
            top_token=token_or_none(vocab, top),
            explanation=explained.get(i, (None, None))[0],
            explanation_score=explained.get(i, (None, None))[1],
        )
        for i, density, max_act, mean_act, n_fired, top in rows
    ]
    return schemas.FeaturePage(sae=name, total=total, offset=offset, limit=limit, features=feats)


class FeatureRef(NamedTuple):
    """What the hot paths need to know about an SAE and its live mining run (one small query)."""

    sae: str
    model_id: int
    n_latents: int
    sae_path: str
    run_id: int | None
    mined_tokens: int | None


# The hot paths (feature page, examples) run statements built once with bound parameters, each
# joining from the SAE's name so that a request costs two or three round trips; building a select()
# per request cost more than running it on SQLite.
_REF_COLUMNS = (SAE.name, SAE.model_id, SAE.n_latents, SAE.path, SAE.active_run_id, MiningRun.tokens)  # FeatureRef's fields
_REF = select(*_REF_COLUMNS).outerjoin(MiningRun, SAE.active_run_id == MiningRun.id).where(SAE.name == bindparam("name"))
_FEATURE = Prepared(  # the feature's row once per explanation it has (once with nulls when it has none)
    select(*_REF_COLUMNS, *Feature.__table__.c, *explanations.COLUMNS)
    .join(MiningRun, SAE.active_run_id == MiningRun.id)
    .join(Feature, (Feature.run_id == SAE.active_run_id) & (Feature.index == bindparam("index")))
    .outerjoin(Explanation, (Explanation.run_id == Feature.run_id) & (Explanation.feature_index == Feature.index))
    .where(SAE.name == bindparam("name"))
    .order_by(*explanations.ORDER)
)
_FEATURE_KEYS = tuple(Feature.__table__.c.keys())
_FEATURE_JSON = ("histogram", "intervals", "logits", "neighbours", "coactivation")
_EXAMPLE_WHERE = (SAE.name == bindparam("name"), Example.feature_index == bindparam("index"), Example.kind == bindparam("kind"))
_EXAMPLES = {
    kind: Prepared(
        select(
            SAE.model_id,
            Example.interval,
            Example.rank,
            Example.doc_id,
            Example.doc_offset,
            Example.token_ids,
            Example.acts,
            Example.max_act,
            Example.max_pos,
            func.count().over().label("total"),
        )
        .join(SAE, Example.run_id == SAE.active_run_id)
        .where(*_EXAMPLE_WHERE)
        .order_by(*order)
        .offset(bindparam("offset", type_=Integer))
        .limit(bindparam("limit", type_=Integer))
    )
    for kind, order in ((schemas.ExampleKind.top, [Example.rank]), (schemas.ExampleKind.interval, [Example.interval.desc(), Example.rank]))
}
_EXAMPLE_COUNT = select(func.count()).select_from(Example).join(SAE, Example.run_id == SAE.active_run_id).where(*_EXAMPLE_WHERE)


class _ExampleRow(NamedTuple):  # a row of _EXAMPLES, in its column order
    model_id: int
    interval: int | None
    rank: int
    doc_id: str
    doc_offset: int
    token_ids: bytes
    acts: bytes
    max_act: float
    max_pos: int
    total: int


def _decode(rows: list[_ExampleRow], vocab: list[str]) -> list[tuple[list[str], list[int], list[float]]]:
    """(tokens, token ids, activations) of each example row (store/codec.py decodes them in one pass)."""
    decoded = codec.decode_rows([r.token_ids for r in rows], [r.acts for r in rows])
    texts = token_texts(vocab, [t for ids, _ in decoded for t in ids])
    out, start = [], 0
    for ids, acts in decoded:
        out.append((texts[start : start + len(ids)], ids, acts))
        start += len(ids)
    return out


def feature_ref(conn: Connection, name: str, index: int) -> FeatureRef:
    """The SAE and run behind feature `index` of `name`; NotFound names what is missing."""
    row = conn.execute(_REF, {"name": name}).first()
    if row is None:
        raise NotFound(f"no SAE named {name!r}")
    ref = FeatureRef(*row)
    if not 0 <= index < ref.n_latents:
        raise NotFound(f"{name} has features 0..{ref.n_latents - 1}; there is no feature {index}")
    if ref.run_id is None:
        raise NotFound(f"{name} has not been mined yet: run `saescope mine --sae {ref.sae_path}`")
    return ref


def get_feature(conn: Connection, name: str, index: int) -> tuple[FeatureRef, dict]:
    """The SAE's live run and feature `index`'s row of it, its explanations' rows under "explanation_rows"
    (one statement; NotFound names what is missing)."""
    rows = _FEATURE.rows(conn, {"name": name, "index": index})
    if not rows:  # find out what is missing, for the message
        feature_ref(conn, name, index)
        raise NotFound(f"feature {index} of {name} is missing from its mining run")
    ref_len, end = len(FeatureRef._fields), len(FeatureRef._fields) + len(_FEATURE_KEYS)
    f = dict(zip(_FEATURE_KEYS, rows[0][ref_len:end]))
    for key in _FEATURE_JSON:
        f[key] = json_value(f[key])
    f["explanation_rows"] = [r[end:] for r in rows]
    return FeatureRef(*rows[0][:ref_len]), f


def _detail(conn: Connection, ref: FeatureRef, f: dict) -> schemas.FeatureDetail:
    vocab = VOCAB.get(conn, ref.model_id)

    def tv(pairs: Iterable[tuple[int, float]]) -> list[schemas.TokenValue]:
        return [schemas.TokenValue(token_id=t, token=token_text(vocab, t), value=v) for t, v in pairs]

    index = f["feature_index"]
    assert ref.run_id is not None  # get_feature joins the live run
    return schemas.FeatureDetail(
        sae=ref.sae,
        n_latents=ref.n_latents,
        index=index,
        density=f["density"],
        max_act=f["max_act"],
        mean_act=f["mean_act"],
        n_fired=f["n_fired"],
        top_token=token_or_none(vocab, f["top_token_id"]),
        histogram=f["histogram"],
        intervals=f["intervals"],
        logits_top=tv(f["logits"]["top"]),
        logits_bottom=tv(f["logits"]["bottom"]),
        neighbours=[schemas.Neighbour(index=i, cosine=c, top_token=token_or_none(vocab, t)) for i, c, t in f["neighbours"]],
        coactivation=None
        if f["coactivation"] is None
        else [
            schemas.CoFiring(index=i, count=n, p_given=p, jaccard=j, top_token=token_or_none(vocab, t))
            for i, n, p, j, t in f["coactivation"]
        ],
        explanation=f["explanation"],
        explanations=explanations.from_rows(f["explanation_rows"], vocab),
    )


def examples(conn: Connection, name: str, index: int, kind: schemas.ExampleKind, offset: int, limit: int) -> dict:
    """A page of a feature's examples, as the JSON shape of schemas.ExamplePage: one statement when
    the page is not empty; an empty page also checks that the SAE and feature exist (NotFound) and
    counts the examples before `offset`.

    Plain dicts rather than pydantic models, and a statement run on the driver (app/prepared.py):
    this is the API's hottest endpoint, and building and serialising ~20 models cost more than the
    query (the API test validates the shape)."""
    params = {"name": name, "index": index, "kind": kind.value}
    rows = [_ExampleRow._make(r) for r in _EXAMPLES[kind].rows(conn, {**params, "offset": offset, "limit": limit})]
    total = rows[0].total if rows else 0  # the window count rides along with the rows
    if not rows:
        feature_ref(conn, name, index)
        if offset:
            total = conn.execute(_EXAMPLE_COUNT, params).scalar() or 0
    vocab = VOCAB.get(conn, rows[0].model_id) if rows else []
    out = [
        {
            "kind": kind.value,
            "interval": e.interval,
            "rank": e.rank,
            "doc_id": e.doc_id,
            "doc_offset": e.doc_offset,
            "tokens": texts,
            "token_ids": ids,
            "acts": acts,
            "max_act": e.max_act,
            "max_pos": e.max_pos,
        }
        for e, (texts, ids, acts) in zip(rows, _decode(rows, vocab))
    ]
    return {"sae": name, "index": index, "kind": kind.value, "total": total, "offset": offset, "limit": limit, "examples": out}


def feature_detail(conn: Connection, name: str, index: int) -> schemas.FeatureDetail:
    return _detail(conn, *get_feature(conn, name, index))


class FeatureView(NamedTuple):
    """Everything the feature page shows on first paint."""

    feature: schemas.FeatureDetail
    examples: dict  # schemas.ExamplePage's JSON shape (see examples())
    mined_tokens: int
    vocab: list[str]  # the model's token strings (render.context_html draws tokens from it)


def feature_view(conn: Connection, name: str, index: int, kind: schemas.ExampleKind, offset: int, limit: int) -> FeatureView:
    ref, f = get_feature(conn, name, index)
    detail = _detail(conn, ref, f)
    return FeatureView(detail, examples(conn, name, index, kind, offset, limit), ref.mined_tokens or 0, VOCAB.get(conn, ref.model_id))


def search(conn: Connection, query: str, sae_name: str | None, limit: int) -> dict:
    """Features whose top contexts peak on a token containing `query` (case-insensitive), and features
    whose explanations match it by meaning (app/meaning_search.py), as schemas.SearchResult's JSON shape.

    Plain dicts, as in examples(): at a million features a common token has a full page of hits, and
    building and validating a model per hit made the answer grow with the store. The token's features
    are sorted and cut to `limit` before their densities are joined, so that only the hits shown are
    looked up (a token peaks in ~125 features at 1M)."""
    needle = query.lower()
    stmt = select(SAE.name, SAE.active_run_id, SAE.model_id).where(SAE.active_run_id.is_not(None)).order_by(SAE.name)
    if sae_name is not None:
        stmt = stmt.where(SAE.name == sae_name)
    saes = conn.execute(stmt).all()
    hits: list[dict] = []
    for name, run_id, model_id in saes:
        vocab = VOCAB.get(conn, model_id)
        token_ids = [i for i, t in enumerate(VOCAB.lowered(conn, model_id)) if needle in t][:5000]
        if not token_ids:
            continue
        best = (
            select(TokenFeature.feature_index, TokenFeature.token_id, TokenFeature.n_examples, TokenFeature.max_act)
            .where(TokenFeature.run_id == run_id, TokenFeature.token_id.in_(token_ids))
            .order_by(TokenFeature.n_examples.desc(), TokenFeature.max_act.desc(), TokenFeature.feature_index)
            .limit(limit)
            .subquery()
        )
        rows = conn.execute(
            select(best, Feature.density)
            .join(Feature, (Feature.run_id == run_id) & (Feature.index == best.c.feature_index))
            .order_by(best.c.n_examples.desc(), best.c.max_act.desc(), best.c.feature_index)
        ).all()
        hits += [
            {"sae": name, "index": f, "token": token_text(vocab, t), "n_examples": n, "max_act": m, "density": d} for f, t, n, m, d in rows
        ]
    hits.sort(key=lambda h: (-h["n_examples"], -h["max_act"]))
    features, notes = search_by_meaning.by_meaning(conn, query, sae_name, limit)  # explanations: full text + semantic
    return {"query": query, "hits": hits[:limit], "features": [h.model_dump() for h in features], "notes": notes}
