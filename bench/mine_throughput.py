"""Mining throughput against the bare forward pass, store size per feature, and SAEDashboard.

    python bench/mine_throughput.py [--tokens 32768] [--n-latents 16384] [--layer 8] [--repeats 2]

Same process, same model, same windows, alternating runs:
  forward   windows -> model cut at the hook (what any miner must pay)
  pass      forward + SAE encode + writing the codes (mine's one pass over the corpus)
  mine      `saescope mine` end to end into a fresh SQLite store: pass, statistics, logit effects,
            neighbours, and the database write
The SAE is a freshly initialised 16384-latent TopK SAE (tied init): mining cost does not depend on
training, only on the widths, k and the corpus. SAEDashboard is run from its own virtual
environment (`--dashboard-python`, e.g. /tmp/peers/dash/bin/python) when given.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sae_core import corpus as corpus_mod  # noqa: E402
from sae_core.cache import CacheConfig  # noqa: E402
from sae_core.interchange import save_sae  # noqa: E402
from sae_core.mine import CodeEncoder, MineConfig, mine  # noqa: E402
from sae_core.model import hook_name, load_model  # noqa: E402
from sae_core.sae import TopKConfig, TopKSAE  # noqa: E402
from sae_core.shard_writer import fill_shards  # noqa: E402
from sae_core.windows import WindowSource  # noqa: E402

CONTEXT, BATCH = 128, 16


def bare_forward(lm, layer: int, tokens: int) -> float:
    corpus = corpus_mod.open_corpus("demo")
    windows = corpus_mod.iter_windows(corpus, lm.tokenizer, CONTEXT, 0)
    n_windows = -(-tokens // CONTEXT)
    t0 = time.perf_counter()
    done = 0
    while done < n_windows:
        batch = [w.tokens for _, w in zip(range(min(BATCH, n_windows - done)), windows)]
        lm.residuals(torch.from_numpy(np.concatenate(batch)).long(), layer)
        done += len(batch)
    return n_windows * CONTEXT / (time.perf_counter() - t0)


def one_pass(lm, sae, layer: int, tokens: int, work: Path) -> float:
    shutil.rmtree(work, ignore_errors=True)
    cfg = CacheConfig(model="smollm2-135m", hook=hook_name(layer), corpus="demo", context_size=CONTEXT, tokens=tokens,
                      batch_size=BATCH, windows_per_shard=256, dtype="float32")
    encoder = CodeEncoder(sae, sae.cfg.k, lm.dtype, {"bench": True})
    t0 = time.perf_counter()
    corpus = corpus_mod.open_corpus(cfg.corpus)
    fill_shards(cfg, work, None, lm, corpus.doc_ids, lambda start: WindowSource(lm, corpus, cfg, start), encoder, progress=False)
    return -(-tokens // CONTEXT) * CONTEXT / (time.perf_counter() - t0)


def full_mine(lm, sae_dir: Path, tokens: int, root: Path) -> tuple[float, int]:
    db_path = root / "store.db"
    for p in root.glob("store.db*"):
        p.unlink()
    t0 = time.perf_counter()
    mine(sae_dir, MineConfig(tokens=tokens, db=f"sqlite:///{db_path}", batch_size=BATCH, force=True), lm=lm, progress=False)
    rate = -(-tokens // CONTEXT) * CONTEXT / (time.perf_counter() - t0)
    import sqlite3
    con = sqlite3.connect(db_path)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    return rate, db_path.stat().st_size


def dashboard(python: str, lm, sae_dir: Path, tokens: int, layer: int, root: Path) -> dict:
    """Run bench/peers/dashboard_driver.py in SAEDashboard's own venv on the windows saescope mines."""
    windows = corpus_mod.iter_windows(corpus_mod.open_corpus("demo"), lm.tokenizer, CONTEXT, 0)
    np.save(root / "tokens.npy", np.concatenate([w.tokens for _, w in zip(range(-(-tokens // CONTEXT)), windows)]))
    driver = Path(__file__).resolve().parent / "peers" / "dashboard_driver.py"
    proc = subprocess.run([python, str(driver), "--sae", str(sae_dir), "--tokens-file", str(root / "tokens.npy"), "--layer", str(layer)],
                          capture_output=True, text=True, timeout=3600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1])
    tail = [line for line in (proc.stderr or proc.stdout).strip().splitlines() if line.strip()][-1:]
    return {"error": " | ".join(tail)[:400]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--n-latents", type=int, default=16384)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--layer", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dashboard-python", default=None, help="python of a venv with sae-dashboard installed")
    ap.add_argument("--dashboard-tokens", type=int, default=4096, help="tokens for the SAEDashboard comparison (it is slow)")
    args = ap.parse_args()

    lm = load_model("smollm2-135m")
    root = Path(tempfile.mkdtemp(prefix="saescope-mine-bench-"))
    torch.manual_seed(0)
    sae = TopKSAE(TopKConfig(d_in=lm.d_model, n_latents=args.n_latents, k=args.k))
    cache_meta = {"model": "smollm2-135m", "hook": hook_name(args.layer), "corpus": "demo", "context_size": CONTEXT,
                  "skip_positions": 1, "seed": 0}
    sae_dir = save_sae(sae, root / f"random-{args.n_latents}", metadata={"cache": cache_meta})
    print(f"smollm2-135m ({lm.dtype}) layer {args.layer}, {args.tokens:,} tokens, SAE {args.n_latents} latents k={args.k}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU {torch.backends.cpu.get_cpu_capability()}")
    bare_forward(lm, args.layer, 4096)   # warm-up
    rows = {"forward": [], "pass": [], "mine": []}
    size = 0
    for r in range(args.repeats):
        rows["forward"].append(bare_forward(lm, args.layer, args.tokens))
        rows["pass"].append(one_pass(lm, sae, args.layer, args.tokens, root / "pass"))
        rate, size = full_mine(lm, sae_dir, args.tokens, root)
        rows["mine"].append(rate)
        print(f"  repeat {r + 1}: forward {rows['forward'][-1]:,.0f} tok/s, pass {rows['pass'][-1]:,.0f}, mine end to end {rate:,.0f}")
    med = {k: statistics.median(v) for k, v in rows.items()}
    best = {k: max(v) for k, v in rows.items()}
    print("\n| stage | tok/s (median / best) | cost vs forward (median / best) |\n|---|---|---|")
    for k in rows:
        print(f"| {k} | {med[k]:,.0f} / {best[k]:,.0f} | {med['forward'] / med[k]:.2f}x / {best['forward'] / best[k]:.2f}x |")
    print(f"\nstore: {size / 2**20:.1f} MiB for {args.n_latents} features = {size / args.n_latents / 1024:.1f} KB per feature "
          f"(defaults: 32 top + 50 interval examples of 32 tokens; includes the {lm.tokenizer.vocab_size:,}-token vocabulary)")
    if args.dashboard_python:
        res = dashboard(args.dashboard_python, lm, sae_dir, args.dashboard_tokens, args.layer, root)
        ours, _ = full_mine(lm, sae_dir, args.dashboard_tokens, root)
        if "error" in res:
            print(f"\nSAEDashboard: could not run here: {res['error']}")
        else:
            print(f"\nSame {args.dashboard_tokens:,} tokens, all {args.n_latents} features, end to end: SAEDashboard "
                  f"{res['tokens_per_s']:,.0f} tok/s (SaeVisRunner.run), saescope mine {ours:,.0f} tok/s "
                  f"(incl. database write): {ours / res['tokens_per_s']:.1f}x")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
