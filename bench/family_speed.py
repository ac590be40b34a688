"""Family matching speed: an 8k-latent SAE against a 32k-latent one (issue 27's goal: under 30 s on the
2-core CPU machine), and the same-width match of two 8k SAEs.

    python bench/family_speed.py [--narrow 8192] [--wide 32768] [--d 576] [--k 32] [--sample 16384] [--repeats 2]

Synthetic SAEs of the bundled model's width: TopK SAEs with random unit decoder rows and tied encoders,
the narrow ones' first half planted as splits (row i the normalised sum of wide rows 2i and 2i+1), and
an activation sample built from the wide SAE's directions (each position a sum of k of them), so both
SAEs fire sparsely and half the narrow features have children to find and confirm. Timed stages, as `saescope family` runs them (database
write excluded; it is one bulk load of at most one row per wide feature):
  encode   the narrow and the wide SAE encode the sample (relations.families.active_matrix), in the
           family's compute dtype (the miner's: bf16 on bf16 hardware) and, as the peer, in fp32
  split    decoder cosine of every wide row against every narrow row, in blocks, then co-activation
           of the candidate pairs (relations.families.split_relations)
  match    two narrow SAEs against each other, both directions (relations.families.match_relations)
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sae_core.model import resolve_dtype  # noqa: E402
from sae_core.relations.families import active_matrix, match_relations, split_relations  # noqa: E402
from sae_core.sae import TopKConfig, TopKSAE  # noqa: E402


def random_sae(d: int, n: int, k: int, seed: int) -> TopKSAE:
    torch.manual_seed(seed)
    return TopKSAE(TopKConfig(d_in=d, n_latents=n, k=k))  # tied init: random unit decoder rows, W_enc = W_dec


def sample(wide: TopKSAE, positions: int, k: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, wide.cfg.n_latents, (positions, k), generator=gen)
    weights = torch.rand(positions, k, generator=gen) + 0.5
    return torch.nn.functional.embedding_bag(idx, wide.W_dec.detach(), per_sample_weights=weights, mode="sum")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--narrow", type=int, default=8192)
    ap.add_argument("--wide", type=int, default=32768)
    ap.add_argument("--d", type=int, default=576)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--sample", type=int, default=16384, help="positions encoded (saescope family --sample-tokens)")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    print(f"{args.narrow:,} x {args.wide:,} latents, d={args.d}, k={args.k}, {args.sample:,} sample positions; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")  # fmt: skip
    narrow, narrow2, wide = (
        random_sae(args.d, args.narrow, args.k, 0),
        random_sae(args.d, args.narrow, args.k, 1),
        random_sae(args.d, args.wide, args.k, 2),
    )
    with torch.no_grad():
        half = args.narrow // 2
        planted = torch.nn.functional.normalize(wide.W_dec[0 : 2 * half : 2] + wide.W_dec[1 : 2 * half : 2], dim=1)
        for sae in (narrow, narrow2):
            sae.W_dec[:half] = planted
            sae.W_enc[:half] = planted
    x = sample(wide, args.sample, args.k, 3)
    dtype = resolve_dtype("auto", torch.device("cpu"))  # what `saescope family` encodes in (FamilyConfig.model_dtype auto)
    times: dict[str, list[float]] = {"encode": [], "encode_fp32": [], "split": [], "match": []}
    planted_children = set(range(2 * half))
    for r in range(args.repeats):
        t0 = time.perf_counter()
        a_narrow, a_wide = active_matrix(narrow, x, dtype=dtype), active_matrix(wide, x, dtype=dtype)
        t1 = time.perf_counter()
        rel = split_relations(narrow.W_dec.detach(), wide.W_dec.detach(), a_narrow, a_wide, 0.4, 0.2)
        t2 = time.perf_counter()
        a_narrow2 = active_matrix(narrow2, x, dtype=dtype)
        m1 = match_relations(narrow.W_dec.detach(), narrow2.W_dec.detach(), a_narrow, a_narrow2, 0.7, 0.2)
        m2 = match_relations(narrow2.W_dec.detach(), narrow.W_dec.detach(), a_narrow2, a_narrow, 0.7, 0.2)
        t3 = time.perf_counter()
        active_matrix(narrow, x, dtype=torch.float32), active_matrix(wide, x, dtype=torch.float32)
        t4 = time.perf_counter()
        times["encode"].append(t1 - t0)
        times["split"].append(t2 - t1)
        times["match"].append(t3 - t2)  # the second narrow SAE's encoding included
        times["encode_fp32"].append(t4 - t3)
        found = sum(1 for c, p in zip(rel.target.tolist(), rel.source.tolist()) if c in planted_children and p == c // 2)
        print(f"  repeat {r + 1}: encode narrow + wide {t1 - t0:.1f} s ({dtype}; fp32 {t4 - t3:.1f} s), split {t2 - t1:.1f} s "
              f"({len(rel):,} relations, {found:,} of {len(planted_children):,} planted children), "
              f"match both ways {t3 - t2:.1f} s ({len(m1) + len(m2):,})")  # fmt: skip
    med = {k: statistics.median(v) for k, v in times.items()}
    print("\n| stage | seconds (median of %d) |\n|---|---|" % args.repeats)
    print(f"| encode {args.sample:,} positions with the {args.narrow:,} and the {args.wide:,} SAE ({dtype}) | {med['encode']:.1f} |")
    print(f"| (the same encoding in fp32, the peer) | ({med['encode_fp32']:.1f}) |")
    print(f"| split: {args.wide:,} x {args.narrow:,} cosines + co-activation | {med['split']:.1f} |")
    print(f"| **{args.narrow:,} x {args.wide:,} family, total** | **{med['encode'] + med['split']:.1f}** |")
    print(f"| match two {args.narrow:,} SAEs, both directions (encoding the second included) | {med['match']:.1f} |")
    print(f"\npeak resident memory {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")


if __name__ == "__main__":
    main()
