"""What counting co-activation adds to mining: `saescope mine` with `--coactivation 16` against
`--coactivation 0`, same SAE, same tokens, alternating runs into fresh SQLite stores (issue 27's goal:
at most 10%).

    python bench/coactivation_overhead.py [--sae FOLDER] [--tokens 65536] [--repeats 2]

--sae: a trained SAE folder (copied to a temporary folder first: mining writes its work files beside the
SAE); its training cache, where it still holds the windows, is read instead of running the model, as the
demo's mining does. Without --sae: a freshly initialised 16,384-latent k=32 TopK SAE on the bundled
model's layer 8, mined through the model (random codes co-fire more evenly than trained ones: more
distinct pairs, a harsher case for the count).

Up to 16,384 latents the counter counts into a dense int32 [n, n] array (sae_core/coactivation.py);
both SAEs above are counted that way; a wider --sae times the sparse product used beyond it.

Also timed: the statistics sweep alone (feature_stats.compute over the same kept chunks, with and
without the counter, plus choosing the top partners), the part of mining the count lives in.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sae_core import feature_stats  # noqa: E402
from sae_core.coactivation import CoactivationCounter  # noqa: E402
from sae_core.config import StatsConfig  # noqa: E402
from sae_core.interchange import load_sae, save_sae  # noqa: E402
from sae_core.mine import MineConfig, mine  # noqa: E402
from sae_core.model import hook_name, load_model  # noqa: E402
from sae_core.sae import TopKConfig, TopKSAE  # noqa: E402


def timed_mine(lm, sae_dir: Path, tokens: int, root: Path, partners: int, keep: Path | None = None) -> float:
    for p in root.glob("store.db*"):
        p.unlink()
    cfg = MineConfig(tokens=tokens, db=f"sqlite:///{root / 'store.db'}", coactivation=partners, force=True)
    if keep is not None:  # keep the chunks for the sweep-only timing
        original = shutil.rmtree
        shutil.rmtree = lambda path, **kw: (shutil.copytree(path, keep, dirs_exist_ok=True), original(path, **kw))  # type: ignore[assignment]
    try:
        t0 = time.perf_counter()
        mine(sae_dir, cfg, lm=lm, progress=False)
        return time.perf_counter() - t0
    finally:
        if keep is not None:
            shutil.rmtree = original


def timed_sweep(chunks: feature_stats.CodeChunks, n: int, rows: int, context: int, partners: int) -> float:
    t0 = time.perf_counter()
    counter = CoactivationCounter(n) if partners else None
    feature_stats.compute(chunks, n, rows, context, StatsConfig(), progress=False, coactivation=counter)
    if counter is not None:
        counter.top_partners(partners)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sae", type=Path, default=None, help="a trained SAE folder (copied first)")
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--partners", type=int, default=16)
    args = ap.parse_args()

    root = Path(tempfile.mkdtemp(prefix="saescope-coact-bench-"))
    if args.sae is not None:
        sae_dir = Path(shutil.copytree(args.sae, root / args.sae.name, ignore=shutil.ignore_patterns("checkpoint.pt", "mining")))
        loaded = load_sae(sae_dir)
        sae, model = loaded.sae, loaded.provenance.model
    else:
        model = "smollm2-135m"
        torch.manual_seed(0)
        sae = TopKSAE(TopKConfig(d_in=576, n_latents=16384, k=32))
        meta = {"model": model, "hook": hook_name(8), "corpus": "demo", "context_size": 128, "skip_positions": 1, "seed": 0}
        sae_dir = save_sae(sae, root / "random-16384", metadata={"cache": meta})
    lm = load_model(model or "smollm2-135m")
    n = sae.cfg.n_latents
    print(f"{sae_dir.name}: {n:,} latents, k={getattr(sae.cfg, 'k', None)}, {args.tokens:,} tokens, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")  # fmt: skip
    kept = root / "chunks"
    timed_mine(lm, sae_dir, min(args.tokens, 8192), root, args.partners)  # warm-up; also loads (or compiles once) the numba count
    runs: dict[int, list[float]] = {args.partners: [], 0: []}
    for r in range(args.repeats):
        order = (args.partners, 0) if r % 2 == 0 else (0, args.partners)
        for partners in order:
            runs[partners].append(timed_mine(lm, sae_dir, args.tokens, root, partners, keep=kept if r == 0 else None))
        print(f"  repeat {r + 1}: mine with co-activation {runs[args.partners][-1]:.1f} s, without {runs[0][-1]:.1f} s")
    prov = load_sae(sae_dir).provenance
    chunks = feature_stats.CodeChunks(sorted(kept.glob("shard_*.safetensors")), prov.skip_positions)
    rows, context = prov.context_size - prov.skip_positions, prov.context_size
    sweeps: dict[int, list[float]] = {args.partners: [], 0: []}
    for r in range(args.repeats):
        for partners in (args.partners, 0) if r % 2 == 0 else (0, args.partners):
            sweeps[partners].append(timed_sweep(chunks, n, rows, context, partners))
    counter = CoactivationCounter(n)
    for c in range(len(chunks)):
        row, feature, _ = chunks.coo(chunks.load(c))
        counter.add(row, feature)
    pairs = counter.counts().nnz
    on, off = statistics.median(runs[args.partners]), statistics.median(runs[0])
    s_on, s_off = statistics.median(sweeps[args.partners]), statistics.median(sweeps[0])
    print(f"\n| {args.tokens:,} tokens, {n:,} latents | with co-activation | without | added |\n|---|---|---|---|")
    print(f"| `saescope mine`, end to end (median of {args.repeats}) | {on:.1f} s | {off:.1f} s | **{(on / off - 1) * 100:+.1f}%** |")
    print(
        f"| statistics sweep + top partners (median of {args.repeats}) | {s_on:.1f} s | {s_off:.1f} s | {(s_on / s_off - 1) * 100:+.1f}% |"
    )
    dense = counter.upper is not None
    held = f"a dense int32 [n, n] count, {n * n * 4 / 2**20:.0f} MiB" if dense else f"{pairs * 12 / 2**20:.0f} MiB of sparse counts"
    print(f"\ndistinct co-firing pairs (both orders, diagonal included): {pairs:,}; held as {held}")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
