"""Attribution-graph speed (issue 29 item 5): a prompt's graph on the bundled model, every layer's MLP replaced by a
transcoder; node and edge counts before and after pruning, wall and CPU time, peak memory; the peer in the same run
is one plain forward pass of the model on the same prompt (the graph's cost in forward passes).

    nice .venv/bin/python bench/trace_speed.py --tokens 16 --tokens 64 --max-feature-nodes 1024 --time-limit 900

--max-feature-nodes caps the feature nodes chosen by influence (AttributionConfig.max_feature_nodes; "all" for every
active feature); it may be given more than once, each cap is run on each prompt length.

    nice .venv/bin/python bench/trace_speed.py --tokens 16 --selection-check --max-feature-nodes 256 \
        --max-feature-nodes 1024 --max-feature-nodes 4096

--selection-check builds the uncapped graph too and says how much of its features' influence on the logits each cap's
kept features hold, against the best possible (the uncapped graph's top features) and as many random features.

Transcoders: randomly initialised TopK transcoders of the trained ones' shape (n_latents, k), which cost about the same
to trace: a TopK code has up to k active latents per position whichever weights it has (the counts printed say how
many were active); --transcoders DIR loads a trained set instead. --architecture
skip_transcoder (the default, as `saescope train --transcoders all` trains) adds the linear skip term, one more d x d
matrix per layer in every transposed pass.
A build past --time-limit stops; its rate (targets per
second, the share done) is printed with an extrapolation marked as one.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sae_core.circuits.attribution import AttributionConfig, GraphTimeLimit, attribute  # noqa: E402
from sae_core.circuits.prune import influence, logit_weights, normalize_rows, prune  # noqa: E402
from sae_core.circuits.scores import graph_scores  # noqa: E402
from sae_core.model import load_model  # noqa: E402
from sae_core.sae.transcoder import SkipTranscoderSAE, TranscoderConfig, TranscoderSAE  # noqa: E402

TEXT = (
    "The capital of the country whose largest city is Toronto is Ottawa, and the capital of the country whose "
    "largest city is Sydney is Canberra. Rivers, mountains and lakes make the geography of a place; its people "
    "make its history. In the morning the market opens early and the bakers sell fresh bread to the town. "
    "At night the harbour lights guide the fishing boats home."
)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def transcoders(lm, n_latents: int, k: int, skip: bool = False) -> dict[int, TranscoderSAE]:
    out = {}
    for L in range(lm.n_layers):
        g = torch.Generator().manual_seed(L)
        cls = SkipTranscoderSAE if skip else TranscoderSAE
        tc = cls(TranscoderConfig(d_in=lm.d_model, n_latents=n_latents, k=k, layer=L))
        tc.reset_parameters(g)
        if isinstance(tc, SkipTranscoderSAE):  # W_skip starts at zero; a trained one is not (its cost is the same)
            with torch.no_grad():
                tc.W_skip.normal_(0, 0.02, generator=g)
        out[L] = tc.to(lm.dtype).eval().requires_grad_(False)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, action="append", help="prompt lengths (default 16)")
    ap.add_argument("--n-latents", type=int, default=4096)
    ap.add_argument("--architecture", choices=["skip_transcoder", "transcoder"], default="skip_transcoder")
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=AttributionConfig.batch_size)
    ap.add_argument("--max-feature-nodes", action="append", help="feature-node caps (an int or 'all'; default 1024)")
    ap.add_argument("--time-limit", type=float, default=900.0)
    ap.add_argument("--selection-check", action="store_true", help="compare each cap's features with the uncapped graph's")
    ap.add_argument("--transcoders", help="a trained set (`saescope train --transcoders all --out DIR`) instead of random ones")
    ap.add_argument("--attribute-position-0", action="store_true", help="attribute the first position too (`saescope trace` leaves it out)")
    args = ap.parse_args()
    lengths = args.tokens or [16]
    print(f"load average {os.getloadavg()}, torch threads {torch.get_num_threads()}")
    lm = load_model(device="cpu", dtype="float32")
    model = lm.model.eval().requires_grad_(False)
    if args.transcoders:
        from sae_core.evaluation.transcoders import load_transcoders

        tcs = {L: item.sae.eval().requires_grad_(False) for L, item in load_transcoders(args.transcoders).items()}  # type: ignore[misc]
        what = f"trained set {args.transcoders}"
    else:
        tcs = transcoders(lm, args.n_latents, args.k, skip=args.architecture == "skip_transcoder")
        what = f"{args.architecture}s n_latents {args.n_latents} k {args.k} (random init)"
    ids_all = lm.tokenizer(TEXT, return_tensors="pt").input_ids[0]
    print(
        f"model {lm.name}: {lm.n_layers} layers, d_model {lm.d_model}; {what}; position 0 "
        f"{'attributed' if args.attribute_position_0 else 'left out'}; peak RSS after load {peak_rss_mib():.0f} MiB"
    )
    caps = [None if c == "all" else int(c) for c in (args.max_feature_nodes or [str(AttributionConfig.max_feature_nodes)])]
    for n in lengths:
        if args.selection_check:
            selection_check(model, tcs, ids_all[:n], [c for c in caps if c is not None])
            continue
        for cap in caps:
            run_one(model, tcs, ids_all, n, cap, args)


def selection_check(model, tcs: dict[int, TranscoderSAE], ids: torch.Tensor, caps: list[int]) -> None:
    cfg = AttributionConfig(max_prompt_tokens=max(64, len(ids)), max_feature_nodes=None)
    full = attribute(model, tcs, ids, cfg)
    n = full.n_features
    inf = influence(normalize_rows(full.adjacency), logit_weights(full))[:n]  # each feature's, in the uncapped graph
    del full.adjacency
    node = {tuple(f): i for i, f in enumerate(full.features.tolist())}
    best = np.argsort(-inf)
    print(f"{len(ids)} tokens: uncapped graph in {full.meta['seconds']:.1f} s, {n} features", flush=True)
    for cap in caps:
        g = attribute(model, tcs, ids, AttributionConfig(max_prompt_tokens=cfg.max_prompt_tokens, max_feature_nodes=cap))
        kept = [node[tuple(f)] for f in g.features.tolist()]
        random_ones = np.random.default_rng(0).choice(n, min(cap, n), replace=False)
        print(
            f"  cap {cap}: the kept features hold {inf[kept].sum() / inf.sum():.3f} of the uncapped graph's feature "
            f"influence on the logits; its top {cap} hold {inf[best[:cap]].sum() / inf.sum():.3f}, {cap} random ones "
            f"{inf[random_ones].sum() / inf.sum():.3f}; {len(set(kept) & set(best[:cap].tolist())) / cap:.3f} of the "
            f"kept are among its top {cap}; the build's own estimate of the dropped share "
            f"{g.meta['dropped_influence_share']:.3f}; {g.meta['seconds']:.1f} s",
            flush=True,
        )


def run_one(model, tcs: dict[int, TranscoderSAE], ids_all: torch.Tensor, n: int, cap: int | None, args) -> None:
    ids = ids_all[:n]
    assert len(ids) == n, f"the text has only {len(ids_all)} tokens"
    with torch.no_grad():
        model(ids[None])  # warm
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            model(ids[None])
            times.append(time.perf_counter() - t0)
        fwd = sorted(times)[2]  # the median of 5: the machine is shared
    seen: list[tuple[float, int, int]] = []
    start = time.perf_counter()
    cpu0 = time.process_time()
    label = f"{n} tokens, cap {cap if cap is not None else 'all'}"

    def progress(done: int, total: int) -> None:  # a text progress bar, one line per tenth
        seen.append((time.perf_counter() - start, done, total))
        tenth = 10 * done // total
        if len(seen) == 1 or tenth > 10 * seen[-2][1] // total:
            bar = "#" * tenth + "." * (10 - tenth)
            print(f"  {label}: [{bar}] {done}/{total} targets, {seen[-1][0]:.1f} s", flush=True)

    cfg = AttributionConfig(
        max_prompt_tokens=max(64, n),
        batch_size=args.batch_size,
        time_limit_s=args.time_limit,
        max_feature_nodes=cap,
        attribute_position_0=args.attribute_position_0,
    )
    try:
        graph = attribute(model, tcs, ids, cfg, progress)
    except GraphTimeLimit as e:
        t, done, total = seen[-1] if seen else (time.perf_counter() - start, 0, 1)
        print(
            f"{label}: {e}; {done}/{total} targets in {t:.0f} s "
            f"(extrapolated, not measured: ~{t * total / max(done, 1):.0f} s for the whole graph); "
            f"peak RSS {peak_rss_mib():.0f} MiB"
        )
        return
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu0
    t1 = time.perf_counter()
    r = prune(graph)
    prune_s = time.perf_counter() - t1
    s = graph_scores(graph)
    n_edges = int((graph.adjacency != 0).sum())
    m = graph.meta
    print(
        f"{label}: graph in {wall:.1f} s wall, {cpu:.1f} s CPU ({wall / fwd:.0f} forward passes of {fwd * 1e3:.0f} ms, the median of 5); "
        f"{m['active_features']} active features, {m['targets']} targets; graph {graph.n_nodes} nodes "
        f"({graph.n_features} features, {graph.n_errors} errors, {graph.n_pos} tokens, {graph.n_logits} logits), "
        f"{n_edges} non-zero edges; dropped features' share of the kept targets' edge magnitude "
        f"{m['dropped_edge_share']:.3f}, of the estimated feature influence {m['dropped_influence_share']:.3f}; "
        f"pruned (0.8, 0.98) in {prune_s:.1f} s to {r.n_nodes} nodes, {r.n_edges} edges; "
        f"replacement score {s.replacement:.3f}, completeness {s.completeness:.3f}; "
        f"peak RSS {peak_rss_mib():.0f} MiB; load average {os.getloadavg()}",
        flush=True,
    )


if __name__ == "__main__":
    main()
