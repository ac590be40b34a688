"""Speed of `saescope train --transcoders`: transcoders for many layers of the bundled model in one pass.

Measures, in one run under the current load: (a) the peer, the model's forward pass over the same windows capturing
every chosen layer's MLP input and output (what any trainer must pay once per batch), and (b) the whole training run
(forwards + every layer's step + checkpoints). Prints tokens/s of each, their ratio, wall and CPU time, the load average,
and the extrapolation to 30 layers x 1M tokens (steps scale with layers x tokens, the forward with tokens).

    nice .venv/bin/python bench/transcoder_train.py --layers all --tokens 8192 --n-latents 4096 --batch-size 1024
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from sae_core.config import CacheConfig, TrainConfig
from sae_core.model import load_model
from sae_core.train_transcoders import MLPStream, parse_layers, train_transcoders


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", default="all")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--n-latents", type=int, default=4096)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--model-dtype", default="float32", help="the model's dtype (bfloat16: its forward in bf16)")
    ap.add_argument("--bf16", action="store_true", help="the transcoders' encoder GEMMs in bf16 numerics (TrainConfig.bf16)")
    args = ap.parse_args()
    lm = load_model("smollm2-135m", device="cpu", dtype=args.model_dtype)
    layers = parse_layers(args.layers, lm.n_layers)
    stream_cfg = CacheConfig(context_size=128, tokens=args.tokens, device="cpu", model_dtype=args.model_dtype)
    print(f"model {args.model_dtype}, bf16 steps {args.bf16}, load {os.getloadavg()}, threads {torch.get_num_threads()}, layers {len(layers)}, n_latents {args.n_latents}, k {args.k}")

    # the peer: the forward capturing every layer's pairs over the same windows, rows as the trainer gets them
    stream = MLPStream(stream_cfg, layers, lm)
    t0, c0 = time.perf_counter(), time.process_time()
    rows = 0
    for batch in stream.batches(args.batch_size):
        rows += len(batch)
    fwd_wall, fwd_cpu = time.perf_counter() - t0, time.process_time() - c0
    print(f"forward + capture only: {rows} rows in {fwd_wall:.1f} s wall ({fwd_cpu:.1f} s CPU): {rows / fwd_wall:,.0f} tok/s")

    cfg = TrainConfig(n_latents=args.n_latents, k=args.k, batch_size=args.batch_size, device="cpu", checkpoint_every=10**9, bf16=args.bf16)
    with tempfile.TemporaryDirectory() as tmp:
        t0, c0 = time.perf_counter(), time.process_time()
        result = train_transcoders(cfg, stream_cfg, layers, Path(tmp) / "tc", progress=False, lm=lm)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    tokens = result.tokens
    step_wall = max(wall - fwd_wall, 1e-9)  # what the steps, init and saving add to the forwards
    print(f"training: {tokens} tokens, {result.steps} steps in {wall:.1f} s wall ({cpu:.1f} s CPU): {tokens / wall:,.0f} tok/s")
    print(f"ratio training / forward-only time: {wall / fwd_wall:.1f}x")
    per_layer_token = step_wall / (len(layers) * tokens)
    fwd_token = fwd_wall / rows
    est = 1_000_000 * (fwd_token + 30 * per_layer_token)
    print(f"extrapolated to 30 layers x 1M tokens at this load: {est / 60:,.0f} min (goal 20 min)")
    print(f"load after {os.getloadavg()}")


if __name__ == "__main__":
    main()
