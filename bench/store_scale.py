"""Does serving stay flat as the store grows? The same pages on a 16k-feature and a 1M-feature store.

    python bench/store_scale.py [--features 1048576] [--small 16384] [--backends sqlite,postgresql] [--repeats 30]

Each store holds one synthetic SAE written by the real writer (`store.write.write_run`, so the rows,
indexes and checkpoints are exactly what `saescope mine` stores): per feature, statistics, histogram,
interval shares, logit effects and neighbours, plus --top top contexts and --intervals interval
samples of --context tokens (every feature that fired has them), the peak-token search index, and
an explanation per fired feature with its full-text entry and embedding (`explain_synthetic`).
Densities are log-uniform over 1e-7..3e-2 with 2% dead features, so the table's filters (alive,
dead, rare) all have rows. The stores are kept in bench/out and reused.

The server is `saescope serve` with one worker and the response cache off, so each request renders;
one client sends the requests one after another (this measures the cost of a request as the store
grows, not throughput). Per store: the feature page of random features; the SAE page's table
sorted and filtered several ways, at its first, middle and last page; the search API (by peak token,
by full text and by embedding: exact below 50k explanations, faiss's IVF index above). It prints
p50/p99 per size and the ratio of the large store's p50 to the small one's (goal: at most 1.25),
then the rows and bytes of each table and index (for docs/deployment.md's extrapolation).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
OUT = ROOT / "bench" / "out"
PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
VOCAB = 49152
TABLE_VIEWS = [
    ("index", "all", "asc"), ("density", "alive", "desc"), ("max_act", "all", "desc"), ("index", "rare", "asc"),
    ("density", "rare", "asc"), ("max_act", "rare", "desc"), ("index", "dead", "asc"),
]  # fmt: skip
SEARCH_WORDS = ["whale", "ship", "said", "the", "nation", "sea", "war", "ing", "money", "God"]


def synthetic_words(n: int, seed: int = 0) -> list[str]:
    """Token strings: the search words, then pronounceable pieces with and without a leading space."""
    rng = random.Random(seed)
    syllables = ["ba", "ce", "di", "fo", "gu", "ha", "je", "ki", "lo", "mu", "na", "pe", "qui", "ro", "su", "ta", "ve", "wi", "xo", "ze"]
    words = [" " + w for w in SEARCH_WORDS] + SEARCH_WORDS
    while len(words) < n:
        w = "".join(rng.choice(syllables) for _ in range(rng.randint(1, 3)))
        words.append((" " if rng.random() < 0.6 else "") + w)
    return words[:n]


def synthetic_run(n: int, top: int, intervals: int, context: int, seed: int = 0):
    from sae_core.feature_stats import FeatureTables
    from sae_core.store.write import LogitEffects, MinedRun, ModelRecord, Neighbours, SAERecord

    rng = np.random.default_rng(seed)
    positions = 10_000_000
    density = 10 ** rng.uniform(-7, np.log10(3e-2), n)
    n_fired = np.maximum(1, np.round(density * positions)).astype(np.int64)
    n_fired[rng.random(n) < 0.02] = 0
    act_max = np.where(n_fired > 0, rng.uniform(1, 20, n), 0).astype(np.float32)
    bins = 50
    hist = (n_fired[:, None] * np.exp(-np.arange(bins) / 8)[None, :] / 8).astype(np.int64)
    ivals = (n_fired[:, None] * np.exp(-np.arange(10) / 2)[None, :] / 2).astype(np.int64)
    alive = np.nonzero(n_fired)[0]
    per = top + intervals
    ex_feature = np.repeat(alive, per)
    e = len(ex_feature)
    slot = np.tile(np.arange(per), len(alive))
    is_top = slot < top
    tokens = rng.integers(0, VOCAB, size=(e, context), dtype=np.int32)
    acts = (rng.random((e, context), dtype=np.float32) * (rng.random((e, context)) < 0.2)).astype(np.float32)
    max_pos = np.full(e, context * 3 // 4, dtype=np.int64)
    peak = act_max[ex_feature] * np.where(is_top, 1 - slot / (2 * top), 0.3)
    acts[np.arange(e), max_pos] = peak
    tables = FeatureTables(
        positions=positions, n_fired=n_fired, act_sum=n_fired * act_max.astype(np.float64) * 0.3,
        act_min=act_max * 0.01, act_max=act_max, hist_counts=hist, interval_counts=ivals,
        ex_feature=ex_feature, ex_kind=np.where(is_top, 0, 1).astype(np.int8),
        ex_interval=np.where(is_top, -1, slot - top).astype(np.int64), ex_rank=np.where(is_top, slot, 0).astype(np.int64),
        ex_doc_index=rng.integers(0, 1000, e), ex_doc_offset=rng.integers(0, 5000, e),
        ex_tokens=tokens, ex_acts=acts, ex_max_act=peak.astype(np.float32), ex_max_pos=max_pos,
    )
    ids = rng.integers(0, VOCAB, size=(n, 10))
    logits = LogitEffects(ids, np.sort(rng.normal(size=(n, 10)))[:, ::-1], ids[:, ::-1], -np.sort(rng.normal(size=(n, 10))))
    neighbours = Neighbours(rng.integers(0, n, size=(n, 10)), np.sort(rng.uniform(0, 0.6, (n, 10)))[:, ::-1])
    words = synthetic_words(VOCAB)
    model = ModelRecord(name="synthetic-smollm2-vocab", d_model=576, n_layers=30, vocab_size=VOCAB, token_strings=lambda: words)
    sae = SAERecord(name=f"synthetic-{n}", hook="blocks.8.hook_resid_post", architecture="topk", d_in=576, n_latents=n, k=32, path="-")
    return MinedRun(model=model, sae=sae, corpus="synthetic", config={"synthetic": n, "top": top, "intervals": intervals, "context": context},
                    tables=tables, logits=logits, neighbours=neighbours, doc_ids=[f"doc-{i}" for i in range(1000)])


def store_url(backend: str, n: int, shape: str) -> str:
    if backend == "sqlite":
        return f"sqlite:///{OUT / f'scale-{n}-{shape}.db'}"
    schema = f"saescope_scale_{n}_{shape}"
    from sqlalchemy import create_engine, text

    with create_engine(PG_ADMIN).begin() as conn:
        conn.execute(text(f"CREATE SCHEMA IF NOT EXISTS {schema}"))
    return f"postgresql://postgres@127.0.0.1:5432/test?options=-csearch_path%3D{schema}"


def build(url: str, n: int, args) -> None:
    from sae_core.store import db
    from sae_core.store.write import find_complete_run, write_run

    engine = db.open_store(url, upgrade_schema=True)
    run = synthetic_run(n, args.top, args.intervals, args.context)
    if find_complete_run(engine, run.sae.name, run.config) is None:
        t0 = time.perf_counter()
        write_run(engine, run, progress=True)
        print(f"  wrote {n:,} features, {len(run.tables.ex_feature):,} examples in {time.perf_counter() - t0:.0f} s", flush=True)
    explain_synthetic(engine, run.sae.name, run.tables.n_fired)
    engine.dispose()


EMBED_CLUSTERS = 1024  # topics the synthetic explanations' embeddings gather around


def explain_synthetic(engine, sae_name: str, n_fired: np.ndarray, batch: int = 20_000) -> None:
    """One N2G-shaped explanation per fired feature, written as `saescope explain` writes them (the
    explanations table, its full-text index kept by the store's triggers or GIN index): a text of two
    synthetic words (the search words among them), and a float16 embedding near one of EMBED_CLUSTERS
    random directions, so that search by meaning has a million rows to rank."""
    from sqlalchemy import func, insert, select

    from sae_core.explain.embed import DIM, pack
    from sae_core.store.changes import mark_changed
    from sae_core.store.schema import SAE, Explanation

    with engine.connect() as conn:
        sae_id, run_id = conn.execute(select(SAE.id, SAE.active_run_id).where(SAE.name == sae_name)).one()
        if conn.scalar(select(func.count()).select_from(Explanation).where(Explanation.run_id == run_id)):
            return
    rng = np.random.default_rng(1)
    words = synthetic_words(2000)
    centres = rng.standard_normal((EMBED_CLUSTERS, DIM)).astype(np.float32)
    fired = np.nonzero(n_fired)[0]
    t0 = time.perf_counter()
    for start in range(0, len(fired), batch):
        part = fired[start : start + batch]
        vectors = centres[rng.integers(0, EMBED_CLUSTERS, len(part))] + 0.05 * rng.standard_normal((len(part), DIM)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        scores = rng.uniform(0.2, 1.0, (len(part), 2))
        rows = []
        for f, blob, (p, r) in zip(part.tolist(), pack(vectors), scores.tolist()):
            text = f"{words[f % len(words)].strip()} {words[(f * 7 + 3) % len(words)].strip()}"
            rows.append({"run_id": run_id, "feature_index": f, "method": "n2g", "text": text, "patterns": [], "precision": p,
                         "recall": r, "score": 2 * p * r / (p + r), "scores": {}, "search_text": text, "embedding": blob})
        with engine.begin() as conn:
            conn.execute(insert(Explanation), rows)
            mark_changed(conn, sae_id)
        print(f"\r  explained {min(start + batch, len(fired)):,} / {len(fired):,} features", end="", flush=True)
    print(f" in {time.perf_counter() - t0:.0f} s", flush=True)


def timed(client: httpx.Client, paths: list[str], headers=None) -> list[float]:
    out = []
    for p in paths:
        t0 = time.perf_counter()
        r = client.get(p, headers=headers)
        out.append((time.perf_counter() - t0) * 1000)
        if r.status_code != 200:
            raise RuntimeError(f"{p}: HTTP {r.status_code}")
    return out


def endpoints(c: httpx.Client, sae: str, repeats: int, rng: random.Random) -> dict[str, tuple[list[str], dict]]:
    """name -> (paths, headers) of the requests measured on one store."""
    alive = [f["index"] for f in c.get(f"/api/v1/saes/{sae}/features", params={"sort": "density", "order": "desc", "limit": 1000}).json()["features"]]
    out = {"feature page": ([f"/saes/{sae}/features/{rng.choice(alive)}" for _ in range(repeats)], {})}
    for sort, flt, order in TABLE_VIEWS:
        total = c.get(f"/api/v1/saes/{sae}/features", params={"sort": sort, "filter": flt, "limit": 1}).json()["total"]
        for where, offset in (("first", 0), ("middle", total // 2 // 50 * 50), ("last", max(0, (total - 1) // 50 * 50))):
            path = f"/saes/{sae}?sort={sort}&order={order}&filter={flt}&offset={offset}"
            out[f"SAE table {sort}/{flt}/{order}, {where} page"] = ([path] * repeats, {"HX-Request": "true"})
    out["search API"] = ([f"/api/v1/search?q={rng.choice(SEARCH_WORDS)}&sae={sae}" for _ in range(repeats)], {})
    return out


def measure(urls: dict[int, str], repeats: int) -> dict[str, dict[int, list[float]]]:
    """Both stores served at once, each view's requests alternating between them, so that both see the
    same machine (other load on it moves both)."""
    from serve_latency import serve

    os.environ["SAESCOPE_RESPONSE_CACHE_MB"] = "0"  # every request renders
    servers = {n: serve(url, workers=1) for n, url in urls.items()}
    out: dict[str, dict[int, list[float]]] = {}
    try:
        clients = {n: httpx.Client(base_url=base, timeout=600) for n, (_, base) in servers.items()}
        plans = {n: endpoints(c, f"synthetic-{n}", repeats, random.Random(1)) for n, c in clients.items()}
        for n, c in clients.items():  # warm-up: vocabulary, connections, the page cache; the first search by
            timed(c, plans[n]["feature page"][0][:20])  # meaning also loads the run's embeddings and, above
            t0 = time.perf_counter()  # store.explanation_search.EXACT_MAX, builds their inverted-file index
            timed(c, plans[n]["search API"][0][:3])
            print(f"  {n:,} features: the first searches (embedding model, the run's embeddings) took {time.perf_counter() - t0:.1f} s", flush=True)
        for name in plans[next(iter(plans))]:
            for r in range(repeats):  # one request on each store in turn: a slow spell of the machine hits both
                for n, c in clients.items():
                    paths, headers = plans[n][name]
                    out.setdefault(name, {}).setdefault(n, []).extend(timed(c, paths[r : r + 1], headers))
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(timeout=10)
    return out


def sizes(url: str) -> list[tuple[str, int, int]]:
    """(table or index, rows or -, bytes) of the store."""
    from sqlalchemy import create_engine, text

    engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
    rows = []
    with engine.connect() as conn:
        tables = ["features", "examples", "token_features", "feature_order", "vocab"]
        counts = {t: conn.execute(text(f"SELECT count(*) FROM {t}")).scalar() for t in tables}
        if engine.dialect.name == "sqlite":
            try:
                for name, tbl, size in conn.execute(text("SELECT d.name, m.tbl_name, SUM(d.pgsize) FROM dbstat d JOIN sqlite_master m ON m.name = d.name GROUP BY d.name")):
                    if tbl in counts:
                        rows.append((name, counts[tbl] if name == tbl else -1, int(size)))
            except Exception:  # noqa: BLE001 - a SQLite built without DBSTAT: table totals only
                rows = [(t, counts[t], -1) for t in tables]
        else:
            for t in tables:
                rows.append((t, counts[t], conn.execute(text(f"SELECT pg_relation_size('{t}') + pg_relation_size(reltoastrelid) FROM pg_class WHERE relname = '{t}' AND relnamespace = current_schema()::regnamespace")).scalar() or 0))
                for (idx,) in conn.execute(text(f"SELECT indexname FROM pg_indexes WHERE tablename = '{t}' AND schemaname = current_schema()")):
                    rows.append((idx, -1, conn.execute(text(f"SELECT pg_relation_size('{idx}')")).scalar()))
    engine.dispose()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--features", type=int, default=1 << 20)
    ap.add_argument("--small", type=int, default=16384)
    ap.add_argument("--backends", default="sqlite,postgresql")
    ap.add_argument("--top", type=int, default=6, help="top contexts per feature")
    ap.add_argument("--intervals", type=int, default=4, help="interval samples per feature (one per interval)")
    ap.add_argument("--context", type=int, default=24, help="tokens per context")
    ap.add_argument("--repeats", type=int, default=30, help="requests per measurement")
    ap.add_argument("--build-only", action="store_true", help="write the stores and stop")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    shape = f"{args.top}t{args.intervals}i{args.context}c"
    sizes_ = (args.small, args.features)
    for backend in args.backends.split(","):
        urls = {n: store_url(backend, n, shape) for n in sizes_}
        for n, url in urls.items():
            print(f"{backend}, {n:,} features:", flush=True)
            build(url, n, args)
        if args.build_only:
            continue
        results = measure(urls, args.repeats)
        print(f"\n| {backend} | {args.small:,} p50 / p99 ms | {args.features:,} p50 / p99 ms | p50 ratio |\n|---|---|---|---|")
        for name, by_size in results.items():
            (s50, s99), (b50, b99) = quantiles(by_size[args.small]), quantiles(by_size[args.features])
            print(f"| {name} | {s50:.2f} / {s99:.2f} | {b50:.2f} / {b99:.2f} | {b50 / s50:.2f} |")
        print(f"\n| {backend}, {args.features:,} features: table or index | rows | MB |\n|---|---|---|")
        for name, count, size in sizes(urls[args.features]):
            print(f"| {name} | {count if count >= 0 else ''} | {size / 2**20:,.1f} |")
        print(flush=True)


def quantiles(v: list[float]) -> tuple[float, float]:
    return statistics.median(v), sorted(v)[int(0.99 * (len(v) - 1))]


if __name__ == "__main__":
    main()
