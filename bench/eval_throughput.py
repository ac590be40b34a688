"""Evaluation's model work per batch: the old algorithm (the model cut at the hook, then three full
forwards: clean, spliced, zeroed) against `saescope eval`'s (one clean full forward that also gives
the hook's output, then the spliced and zeroed variants from the layer after the hook on).

    python bench/eval_throughput.py [--dtype auto|float32|bfloat16] [--repeats 5] [--layer 8]

SmolLM2 (bundled), a freshly initialised 8,192-latent TopK SAE, one batch of 8 x 128 random tokens;
alternating runs, median; both must give the same sums (checked).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sae_core.evaluate import _downstream, _logprobs, _Sums  # noqa: E402
from sae_core.model import load_model  # noqa: E402
from sae_core.train import TrainConfig, build_sae  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--layer", type=int, default=8)
    args = ap.parse_args()
    lm = load_model("smollm2-135m", "cpu", args.dtype)
    layer, skip = args.layer, 1
    torch.manual_seed(0)
    sae = build_sae(TrainConfig(n_latents=8192, k=32), lm.d_model).eval()
    ids = torch.randint(0, lm.vocab_size, (8, 128), generator=torch.Generator().manual_seed(0))
    targets = ids[:, skip + 1 :]

    def old() -> _Sums:
        sums = _Sums(sum_x=torch.zeros(lm.d_model, dtype=torch.float64))
        x = lm.residuals(ids, layer)[:, skip:].float().reshape(-1, lm.d_model)
        sae.encode(x), sae(x)

        def splice(h: torch.Tensor) -> torch.Tensor:
            out = h.clone()
            out[:, skip:] = sae(h[:, skip:].float()).to(h.dtype)
            return out

        def zero(h: torch.Tensor) -> torch.Tensor:
            out = h.clone()
            out[:, skip:] = 0
            return out

        def logprobs() -> torch.Tensor:
            return _logprobs(lm.model(input_ids=ids, use_cache=False).logits, skip)

        clean = logprobs()
        with lm.replace_residual(layer, splice):
            spliced = logprobs()
        with lm.replace_residual(layer, zero):
            zeroed = logprobs()
        sums.ce_clean += float(-clean.gather(-1, targets.unsqueeze(-1)).sum())
        sums.ce_sae += float(-spliced.gather(-1, targets.unsqueeze(-1)).sum())
        sums.ce_zero += float(-zeroed.gather(-1, targets.unsqueeze(-1)).sum())
        sums.kl += float((clean.exp() * (clean - spliced)).sum())
        return sums

    def new() -> _Sums:
        sums = _Sums(sum_x=torch.zeros(lm.d_model, dtype=torch.float64))
        logits, h = lm.logits_and_residual(ids, layer)
        clean = _logprobs(logits, skip)
        del logits
        x = h[:, skip:].float().reshape(-1, lm.d_model)
        sae.encode(x)
        _downstream(lm, ids, layer, skip, clean, h, sae(x).view(len(ids), -1, lm.d_model), sums)
        return sums

    with torch.inference_mode():
        a, b = old(), new()
        same = (a.ce_clean, a.ce_sae, a.ce_zero, a.kl) == (b.ce_clean, b.ce_sae, b.ce_zero, b.kl)
        times: dict[str, list[float]] = {"old": [], "new": []}
        for _ in range(args.repeats):
            for name, fn in (("old", old), ("new", new)):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    print(f"model dtype {lm.dtype}, batch 8 x 128, layer {layer}, {args.repeats} alternating repeats; same sums: {same}")
    for name, values in times.items():
        print(f"  {name}: median {statistics.median(values):.2f} s  (all: {' '.join(f'{v:.2f}' for v in values)})")
    print(f"  speed-up {statistics.median(times['old']) / statistics.median(times['new']):.2f}x")


if __name__ == "__main__":
    main()
