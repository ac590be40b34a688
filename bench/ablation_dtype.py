"""Ablation sparsity (sae_core/metrics/ablation.py) of one SAE with the model computing in float32 and in
bfloat16: the same windows, positions and ablations. Why the meter runs its forwards in float32.

    python bench/ablation_dtype.py SAE_DIR [--windows 3] [--skip-windows 7813]

The ablated positions come from the corpus windows after --skip-windows (the SAE's corpus and hook).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    from sae_core import corpus as corpus_mod
    from sae_core.interchange import load_sae
    from sae_core.metrics import ablation
    from sae_core.model import load_model, parse_hook

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sae", type=Path)
    ap.add_argument("--windows", type=int, default=3, help="windows, one ablated position each")
    ap.add_argument("--skip-windows", type=int, default=7813)
    ap.add_argument("--horizon", type=int, default=16)
    args = ap.parse_args()

    loaded = load_sae(args.sae)
    prov = loaded.provenance
    layer = parse_hook(prov.hook)
    lm = load_model(prov.model, "cpu", "float32")
    windows = corpus_mod.iter_windows(corpus_mod.open_corpus(prov.corpus), lm.tokenizer, prov.context_size, prov.seed,
                                      skip_windows=args.skip_windows)
    ids = torch.from_numpy(np.concatenate([next(windows).tokens for _ in range(args.windows)])).long()
    results = {}
    ablation.float32_model = lambda model: model  # measure in the model's own dtype
    for dtype in (torch.float32, torch.bfloat16):
        lm.model.to(dtype)
        lm.dtype = dtype
        t = time.perf_counter()
        with torch.inference_mode():
            h = lm.residuals(ids, layer)
        meter = ablation.AblationMeter(lm, loaded.sae, layer, prov.skip_positions, len(ids), args.horizon)
        meter.add(ids, h)
        report = meter.report()
        results[dtype] = report.sparsity
        print(f"{str(dtype):15s} ablation sparsity {report.sparsity:.4f} over {report.ablations} ablations "
              f"({time.perf_counter() - t:.0f} s)", flush=True)
    print(f"bf16 / fp32 = {results[torch.bfloat16] / results[torch.float32]:.2f}x")


if __name__ == "__main__":
    main()
