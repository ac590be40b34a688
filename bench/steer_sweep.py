"""A strength sweep against the same generations one by one (issue 30 item 6), in one run, side by side.

    nice .venv/bin/python bench/steer_sweep.py [--home /work/home-base] [--sae NAME] [--threads N]

The store is copied (the home is read only); the SAE is the store's first mined one unless --sae; the
feature is the demo's steering example's (sae_core/live/example.find_feature), steered with `add` at
5 strengths (multiples of its max activation) over the 8 built-in prompts, 32 new tokens, greedy.
    sweep        LiveRuntime.sweep: the baseline's 8 rows and the 40 steered rows, batched (KV cache, left
                 padding), plus their scoring forwards (lift, KL, fluency cost); no held-out check
    one by one   the 40 steered generations alone, each its own `generate` (what a user clicking through
                 strengths runs), no baseline and no scoring
Both greedy: the bench also counts the rows whose tokens agree (batching changes float order only).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from sqlalchemy import delete

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sae_core.config import GenerationConfig, LiveConfig  # noqa: E402
from sae_core.live.example import find_feature  # noqa: E402
from sae_core.live.interventions import Intervention, SteeringHook  # noqa: E402
from sae_core.live.runtime import LiveRuntime  # noqa: E402
from sae_core.live.sweep import BUILTIN_PROMPTS, SweepRequest  # noqa: E402
from sae_core.store import db as store_db  # noqa: E402
from sae_core.store.schema import SweepRecord  # noqa: E402

MULTIPLES = (0.5, 1.0, 2.0, 4.0, 8.0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--home", default=os.environ.get("SAESCOPE_HOME", "/work/home-base"))
    ap.add_argument("--sae")
    ap.add_argument("--threads", type=int, default=LiveConfig().live_threads, help="torch threads (the model process's --live-threads)")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batch-rows", type=int, default=64)
    ap.add_argument("--one-by-one", type=int, default=40, help="how many of the 40 single generations to time (every k-th; scaled to 40)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="steer-sweep-"))
    for name in ("saescope.db", "saescope.db-wal", "saescope.db-shm"):
        if (Path(args.home) / name).exists():
            shutil.copy(Path(args.home) / name, tmp / name)
    engine = store_db.open_store(f"sqlite:///{tmp / 'saescope.db'}", upgrade_schema=True)  # the copy, brought to this schema
    with engine.begin() as conn:  # a sweep stored in the home store would be read back, not run: time a computation
        conn.execute(delete(SweepRecord))
    runtime = LiveRuntime(LiveConfig(max_new_tokens_limit=256), engine=engine)
    sae_name = args.sae or runtime.preload()
    assert sae_name is not None, "no mined SAE in the store"
    held = runtime.sae(sae_name)
    lm = runtime.lm
    assert lm is not None
    found = find_feature(engine, sae_name)
    feature, word, max_act = found if found is not None else (0, "?", 1.0)
    strengths = tuple(round(m * max_act, 2) for m in MULTIPLES)
    iv = Intervention(feature, "add", 1.0)
    print(f"model {lm.name} ({lm.dtype}), SAE {sae_name}, feature {feature} (peaks on {word!r}, max {max_act:.2f}), add {strengths}")
    print(f"{len(BUILTIN_PROMPTS)} prompts x {len(strengths)} strengths x {args.new_tokens} new tokens, torch threads {args.threads}, "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the start")  # fmt: skip
    runtime.generate(sae_name, "Hello", [], GenerationConfig(max_new_tokens=2))  # warm

    request = SweepRequest(sae_name, iv, strengths, tuple(BUILTIN_PROMPTS), (), max_new_tokens=args.new_tokens, batch_rows=args.batch_rows)
    t0, c0 = time.perf_counter(), time.process_time()
    result = runtime.sweep(
        request, progress=lambda p: p.done % 256 == 0 and print(f"  sweep {p.stage} {p.done}/{p.total}", file=sys.stderr, flush=True)
    )
    sweep_s, sweep_cpu = time.perf_counter() - t0, time.process_time() - c0
    assert not result.stored, "the sweep was read from the store, not computed"
    load_mid = os.getloadavg()[0]
    print(f"sweep done: {sweep_s:.1f} s wall, {sweep_cpu:.1f} s CPU", file=sys.stderr, flush=True)

    settings = GenerationConfig(max_new_tokens=args.new_tokens)
    rows = [(s, i) for s in strengths for i in range(len(BUILTIN_PROMPTS))]
    step = max(1, len(rows) // args.one_by_one)
    timed = rows[::step]
    t0, c0 = time.perf_counter(), time.process_time()
    single: dict[tuple[float, int], list[int]] = {}
    for s, i in timed:
        ids = lm.tokenizer(BUILTIN_PROMPTS[i], add_special_tokens=False)["input_ids"]
        hook = SteeringHook(held.loaded.sae, [iv.with_value(s)], len(ids))
        single[(s, i)] = runtime.continue_(lm, ids, settings, hook, held.layer).token_ids
        print(f"  one by one {len(single)}/{len(timed)}", file=sys.stderr, flush=True)
    scale = len(rows) / len(timed)
    one_s, one_cpu = (time.perf_counter() - t0) * scale, (time.process_time() - c0) * scale
    swept = {(p.strength, i): ids for p in result.points for i, ids in enumerate(p.token_ids)}
    agree = sum(swept[key] == ids for key, ids in single.items())

    print(f"\n{'strength':>9} {'lift':>8} {'KL':>8} {'fluency':>8}   first continuation")
    for p in [result.baseline, *result.points]:
        label = "none" if p.strength is None else f"{p.strength:g}"
        print(f"{label:>9} {p.lift:8.3f} {p.kl:8.3f} {p.fluency:8.3f}   {p.texts[0][:60]!r}")
    print(f"suggested strength: {result.suggested}")
    print(f"\nsweep (48 rows generated + scored, batched): {sweep_s:6.1f} s wall {sweep_cpu:6.1f} s CPU")
    note = "" if len(timed) == len(rows) else f" ({len(timed)} timed, scaled x{scale:g})"
    print(f"one by one (40 generations only{note}): {one_s:6.1f} s wall {one_cpu:6.1f} s CPU")
    print(f"ratio one-by-one / sweep: {one_s / sweep_s:.2f}x wall, {one_cpu / sweep_cpu:.2f}x CPU; rows with the same tokens: "
          f"{agree}/{len(single)}; "
          f"load average {load_mid:.1f} after the sweep, {os.getloadavg()[0]:.1f} at the end")  # fmt: skip
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
