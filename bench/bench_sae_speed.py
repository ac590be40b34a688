"""The benchmark suite's wall time on the demo's 8k SAE (issue 28: one 8k SAE under 10 minutes on CPU),
each stage timed, beside `saescope eval` of the same SAE on the same held-out tokens in the same run
(the peer: the suite's core pass is that evaluation plus its observers).

    python bench/bench_sae_speed.py --home /work/home-base [--sae smollm2-135m-L8-topk-8k] [--seed 0] [--tokens 32768]

The demo store is copied first (the source is read-only); the SAE's folder is the one the store names,
read only (nothing is written into it: the SAEBench JSON goes under bench/out/bench-sae/). Prints the
stage times, the totals, their ratio and every metric.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sae_core.evaluate import EvalConfig, evaluate_loaded  # noqa: E402
from sae_core.evaluation import saebench_json  # noqa: E402
from sae_core.evaluation.config import BenchConfig  # noqa: E402
from sae_core.evaluation.suite import run_suite  # noqa: E402
from sae_core.model import load_model  # noqa: E402
from sae_core.store import db  # noqa: E402
from sae_core.store.weights import load_run_sae  # noqa: E402

OUT = Path(__file__).resolve().parent / "out" / "bench-sae"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--home", default="/work/home-base")
    ap.add_argument("--sae", default="smollm2-135m-L8-topk-8k")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokens", type=int, default=BenchConfig.tokens)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--skip-peer", action="store_true", help="time the suite only")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    store = OUT / "saescope.db"
    src = Path(args.home) / "saescope.db"
    shutil.copyfile(src, store)  # the WAL files too: a copy without them can miss committed pages
    for suffix in ("-wal", "-shm"):
        if Path(f"{src}{suffix}").exists():
            shutil.copyfile(f"{src}{suffix}", f"{store}{suffix}")
    url = f"sqlite:///{store}"
    engine = db.open_store(url, upgrade_schema=True)  # the copy may predate this schema (0007 adds sae_benchmarks)
    start = time.perf_counter()
    lm = load_model("smollm2-135m", "cpu", args.dtype)
    print(f"model loaded in {time.perf_counter() - start:.1f} s (not counted below)")
    cfg = BenchConfig(sae=args.sae, seed=args.seed, tokens=args.tokens, db=url, device="cpu", model_dtype=args.dtype)
    start, cpu_start = time.perf_counter(), time.process_time()
    result, _folder = run_suite(cfg, lm=lm, progress=False, engine=engine)
    suite_s, suite_cpu = time.perf_counter() - start, time.process_time() - cpu_start
    peer_s = None
    if not args.skip_peer:
        with engine.connect() as conn:
            _run, loaded = load_run_sae(conn, args.sae)
        ev = EvalConfig(tokens=args.tokens, batch_size=cfg.batch_size, window_stride=cfg.window_stride, device="cpu")
        ev.model_dtype = args.dtype
        start, cpu_start = time.perf_counter(), time.process_time()
        evaluate_loaded(loaded, args.sae, ev, lm, progress=False)
        peer_s, peer_cpu = time.perf_counter() - start, time.process_time() - cpu_start
    paths = saebench_json.write_files(result, result.saebench[0]["sae_cfg_dict"] if result.saebench else {}, OUT / args.sae)
    (OUT / f"{args.sae}.seed{args.seed}.json").write_text(json.dumps(result.to_dict(), indent=1, default=str))
    print(f"\n{args.sae}, seed {args.seed}, {args.tokens:,} held-out tokens")
    cpu = result.details.get("cpu_seconds", {})
    for stage, seconds in result.details["seconds"].items():
        print(f"  {stage:32s} {seconds:8.1f} s wall, {cpu.get(stage, float('nan')):8.1f} s CPU")
    print(f"  {'suite total':32s} {suite_s:8.1f} s wall, {suite_cpu:8.1f} s CPU ({suite_s / 60:.1f} min wall; goal < 10 min)")
    if peer_s is not None:
        print(f"  {'saescope eval, same tokens':32s} {peer_s:8.1f} s wall, {peer_cpu:8.1f} s CPU (suite/eval {suite_s / peer_s:.2f}x)")
    print(f"  load average during the run: {os.getloadavg()}")
    print(f"  absorption valid: {result.absorption_valid}")
    for name, value in result.metrics.items():
        print(f"  {name:40s} {value:12.4f}")
    print(f"SAEBench JSON: {paths[0].parent if paths else '-'}")


if __name__ == "__main__":
    main()
