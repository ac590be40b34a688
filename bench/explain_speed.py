"""How fast `saescope explain` (N2G) explains every feature of a mined SAE, and how fast search by meaning
answers over the result; peak memory of each part.

Goals (issue: explanations): N2G for all features of a 16,384-latent mined SAE under 5 minutes on 2 cores;
semantic search p99 under 50 ms over 16k features.

References measured in the same run:
- N2G as Foote et al. run it prunes each context with the model: one forward pass per suffix length tried.
  We time exactly that lower bound (every suffix length 1..L of the sample's build contexts, batched by
  length, forward to the hook and SAE encode; no augmentation passes) on a sample of features and
  extrapolate to all of them, against our store-only pruning (sae_core/explain/n2g.py).
- Semantic search against the same ranking computed by reading the embeddings from the store per query
  (what the in-memory index per run saves).

    python bench/explain_speed.py --db sqlite:////path/store.db --sae NAME [--sample 24] [--queries 200]

The store is copied first (SQLite backup API): the benchmark writes explanations into the copy only.
"""

from __future__ import annotations

import argparse
import os
import resource
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PHRASES = [
    "dialogue attribution",
    "whaling",
    "the sea and ships",
    "numbers and years",
    "the president of the united states",
    "e-mail addresses",
    "plural nouns",
    "past tense verbs",
    "prepositions of place",
    "names of people",
    "money and prices",
    "war and the army",
    "religion and god",
    "the end of a sentence",
    "quotation marks",
    "parts of the body",
    "family members",
    "colours",
    "time of day",
    "weather",
    "food and drink",
    "computers and software",
    "law and courts",
    "congress and the senate",
    "taxes",
    "schools and education",
    "animals",
    "the letter s",
    "negation",
    "questions",
    "first person pronouns",
    "adjectives describing size",
    "cities",
    "months of the year",
    "days of the week",
    "measurement units",
    "emotions",
    "movement verbs",
    "the word the",
    "line breaks",
]
SUFFIXES = ["", " in text", " tokens", " words", " and related"]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_seconds() -> float:
    """User + system CPU time of this process so far: on a busy shared machine, the honest measure of work."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def copy_store(url: str, folder: Path) -> str:
    src = sqlite3.connect(url.removeprefix("sqlite:///"))
    dst = sqlite3.connect(folder / "bench.db")
    src.backup(dst)
    src.close()
    dst.close()
    return f"sqlite:///{folder / 'bench.db'}"


def model_pruning_seconds_per_feature(url: str, sae_name: str, sample: int, max_len: int) -> dict:
    """Seconds per feature (wall and CPU) that N2G's model-based pruning needs at least, and that ours
    takes (store-only pruning, wildcards and scoring), both measured on the same `sample` features."""
    import torch
    from sqlalchemy import select

    from sae_core.explain.contexts import read_contexts
    from sae_core.interchange import load_sae
    from sae_core.model import load_model, parse_hook
    from sae_core.store import db
    from sae_core.store.schema import SAE, Feature

    engine = db.open_store(url)
    with engine.connect() as conn:
        run_id, path, hook = conn.execute(select(SAE.active_run_id, SAE.path, SAE.hook).where(SAE.name == sae_name)).one()
        fired = conn.scalars(select(Feature.index).where(Feature.run_id == run_id, Feature.n_fired > 0).order_by(Feature.index)).all()
        rng = np.random.default_rng(0)
        chosen = sorted(rng.choice(fired, size=min(sample, len(fired)), replace=False).tolist())
        contexts = read_contexts(conn, run_id, chosen)
    sae = load_sae(path).sae.eval()
    lm = load_model("smollm2-135m", "cpu", "auto")
    layer = parse_hook(hook)
    from sae_core.explain.n2g import N2GExplainer
    from sae_core.explain.stage import explain_one

    n2g = N2GExplainer()
    t0, c0 = time.perf_counter(), cpu_seconds()
    for feature in contexts:  # ours on the same features, same moment, for the ratio
        explain_one(n2g, n2g, feature)
    ours_wall, ours_cpu = time.perf_counter() - t0, cpu_seconds() - c0
    passes = 0
    t0, c0 = time.perf_counter(), cpu_seconds()
    with torch.inference_mode():
        for feature in contexts:
            build, _ = feature.split()
            rows = [r for r in np.flatnonzero(build)]
            peaks = [int(np.argmax(feature.acts[r])) for r in rows]
            for n in range(1, max_len + 1):  # every suffix length once, the contexts batched
                batch = [
                    feature.tokens[r, p - n + 1 : p + 1]
                    for r, p in zip(rows, peaks)
                    if p - n + 1 >= 0 and feature.tokens[r, p - n + 1] >= 0
                ]
                if not batch:
                    break
                ids = torch.tensor(np.stack(batch), dtype=torch.long)
                x = lm.residuals(ids, layer)[:, -1].float()
                sae.encode(x)[:, feature.index]
                passes += len(batch)
    n = max(len(contexts), 1)
    model_wall, model_cpu = time.perf_counter() - t0, cpu_seconds() - c0
    return {
        "model_wall": model_wall / n,
        "model_cpu": model_cpu / n,
        "ours_wall": ours_wall / n,
        "ours_cpu": ours_cpu / n,
        "passes": passes,
    }


def bench_search(url: str, n_queries: int) -> dict:
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from app import meaning_search as app_search
    from sae_core.explain.embed import unpack
    from sae_core.store import db
    from sae_core.store import explanation_search as store_search
    from sae_core.store.schema import SAE, Explanation

    engine = db.open_store(url)
    queries = [p + s for s in SUFFIXES for p in PHRASES][:n_queries]
    app_search.query_vector("warm up")  # as the server embeds a query (one torch thread)
    with Session(engine) as s:
        run_id = s.scalar(select(SAE.active_run_id))
        n = len(store_search.EMBEDDINGS.get(s.connection(), run_id).keys)
        app_search.by_meaning(s.connection(), "warm up", None, 20)
        total, semantic, embed_only, reference, semantic_cpu = [], [], [], [], []
        for q in queries:
            app_search.query_vector.cache_clear()  # every query embeds afresh
            t, c = time.perf_counter(), time.thread_time()
            vector = app_search.query_vector(q)
            embed_only.append(time.perf_counter() - t)
            store_search.semantic(s.connection(), run_id, vector, 100)
            semantic.append(time.perf_counter() - t)
            semantic_cpu.append(time.thread_time() - c)  # torch runs one thread: the caller's
            app_search.query_vector.cache_clear()
            t = time.perf_counter()
            app_search.by_meaning(s.connection(), q, None, 50)  # embed, rank, full text, fuse: what /api/v1/search adds
            total.append(time.perf_counter() - t)
        for q in queries[:20]:  # the reference: embeddings read from the store per query
            app_search.query_vector.cache_clear()
            t = time.perf_counter()
            vector = app_search.query_vector(q)
            blobs = s.execute(
                select(Explanation.embedding).where(Explanation.run_id == run_id, Explanation.embedding.is_not(None))
            ).scalars()
            matrix = unpack(list(blobs))
            np.argsort(-(matrix @ vector))[:100]
            reference.append(time.perf_counter() - t)

    def pct(xs, p):
        return float(np.percentile(np.array(xs) * 1000, p))

    return {
        "explanations": n,
        "queries": len(queries),
        "semantic_p50_ms": pct(semantic, 50),
        "semantic_p99_ms": pct(semantic, 99),
        "semantic_cpu_p50_ms": pct(semantic_cpu, 50),
        "semantic_cpu_p99_ms": pct(semantic_cpu, 99),
        "embed_p50_ms": pct(embed_only, 50),
        "fused_p50_ms": pct(total, 50),
        "fused_p99_ms": pct(total, 99),
        "reference_p50_ms": pct(reference, 50),
    }


def report_search(url: str, n_queries: int) -> None:
    s = bench_search(url, n_queries)
    print(
        f"search by meaning over {s['explanations']:,} explanations, {s['queries']} distinct queries: "
        f"semantic (embed + rank) p50 {s['semantic_p50_ms']:.1f} ms, p99 {s['semantic_p99_ms']:.1f} ms (goal p99 < 50 ms; "
        f"CPU time p50 {s['semantic_cpu_p50_ms']:.1f} ms, p99 {s['semantic_cpu_p99_ms']:.1f} ms; "
        f"embedding alone p50 {s['embed_p50_ms']:.1f} ms); fused with full text p50 {s['fused_p50_ms']:.1f} ms, "
        f"p99 {s['fused_p99_ms']:.1f} ms; peak RSS {peak_rss_mb():,.0f} MB; load average {os.getloadavg()[0]:.1f}"
    )
    print(
        f"  reference (embeddings read from the store per query) p50 {s['reference_p50_ms']:.1f} ms: "
        f"{s['reference_p50_ms'] / s['semantic_p50_ms']:.1f}x the in-memory index"
    )


def report_reference(url: str, sae: str, sample: int, n: int) -> None:
    r = model_pruning_seconds_per_feature(url, sae, sample, 24)
    print(
        f"reference, model-based pruning (N2G's forward per suffix length, a lower bound) on {sample} features "
        f"({r['passes']:,} suffix passes): {r['model_wall'] * 1000:,.0f} ms per feature wall, {r['model_cpu'] * 1000:,.0f} ms CPU "
        f"-> {r['model_cpu'] * n / 60:,.1f} CPU-minutes for {n:,} features; ours on the same features "
        f"{r['ours_wall'] * 1000:,.1f} ms wall, {r['ours_cpu'] * 1000:,.1f} ms CPU: "
        f"{r['model_cpu'] / max(r['ours_cpu'], 1e-9):,.0f}x less CPU"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--db", required=True, help="a mined SQLite store (copied, never written)")
    ap.add_argument("--sae", required=True)
    ap.add_argument("--sample", type=int, default=24, help="features timed with model-based pruning (the reference)")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--reference-only", action="store_true", help="time the reference and ours on --sample features only")
    ap.add_argument("--search-only", action="store_true", help="--db is already explained: time search (and the reference) only")
    args = ap.parse_args()

    import torch

    from sae_core.config import ExplainConfig
    from sae_core.explain.stage import explain

    print(f"torch threads {torch.get_num_threads()}")
    if args.search_only:
        report_search(args.db, args.queries)
        return
    if args.reference_only:
        report_reference(args.db, args.sae, args.sample, 16_384)
        return
    with tempfile.TemporaryDirectory() as tmp:
        url = copy_store(args.db, Path(tmp))
        from sae_core.explain.embed import embedder

        embedder()  # loaded outside the timing: a server or a second run has it already
        t, cpu = time.perf_counter(), cpu_seconds()
        load = os.getloadavg()[0]
        result = explain(args.sae, ExplainConfig(db=url), progress=True)
        wall, cpu = time.perf_counter() - t, cpu_seconds() - cpu
        n = result.explained
        m = result.metrics
        parts = ", ".join(f"{k} {v:.1f} s" for k, v in result.timings.items())
        print(
            f"N2G explain, store-only pruning, embeddings included: {n:,} features in {wall:.1f} s "
            f"({n / wall:,.0f} features/s; goal: 16,384 in 300 s; {parts}), peak RSS {peak_rss_mb():,.0f} MB"
        )
        print(f"  mean held-out precision {m['n2g_precision']:.3f}, recall {m['n2g_recall']:.3f}, F1 {m['n2g_score']:.3f}")
        print(
            f"  CPU time {cpu:.1f} s (user + system, both threads); load average {load:.1f} before, "
            f"{os.getloadavg()[0]:.1f} after (1 min) on {os.cpu_count()} cores"
        )

        report_search(url, args.queries)

        if not args.skip_reference:
            report_reference(url, args.sae, args.sample, n)
        print(f"peak RSS {peak_rss_mb():,.0f} MB")


if __name__ == "__main__":
    main()
