"""Each SAE architecture at the same width and L0 on the same activations, two seeds each, evaluated the
same way: the table /compare shows, with each metric's spread over seeds (issue 28, item 4).

    python bench/arch_sweep.py --cache /work/home-base/runs/demo/cache --out bench/out/arch_sweep \\
        [--archs topk,batchtopk,jumprelu,matryoshka_batchtopk] [--l0 16,32,64] [--seeds 0,1] [--n-latents 8192] \\
        [--tokens 262144] [--batch-size 2048] [--eval-tokens 4096] [--device auto] \\
        [--store sqlite:///...] [--mine-tokens 16384] [--bench] [--json results.json] [--budget-s SECONDS]

Per (architecture, L0, seed): `saescope train` (sae_core.train, here in process) into OUT/<arch>-L<l0>-s<seed>,
then `saescope eval` (sae_core.evaluate: FVU, L0, CE loss recovered, KL, dead latents; probes and
ablations off unless --eval-probes) on --eval-tokens held-out tokens, one model load for all. A folder
that already holds a trained SAE and its eval.json is reused, so a killed sweep resumes.
- TopK, BatchTopK, Matryoshka BatchTopK: k = the target L0 (BatchTopK's k is per token on average).
- JumpReLU has no k: its L0 comes from its thresholds and its L0 penalty. Calibration: the L0 coefficient
  starts at TopK's marginal FVU per latent at that L0 (from this sweep's TopK runs: the FVU the penalty
  trades a latent against); every threshold starts where the target L0 of latents fire at the tied init
  (the thresholds then move at most ~lr per step in log space). While the first seed's L0 misses the
  target by more than 20% (up to JUMPRELU_ROUNDS times), the start is rescaled by the factor that puts
  the trained SAE's L0 on the target, the coefficient by L0 / target (a weaker penalty when too few fire),
  and the first seed is trained again; the other seeds use the last settings. Every try is in the JSON.
- With --store: each SAE is mined (--mine-tokens, from the corpus start) into the store so /compare can
  show it (the store takes eval.json's metrics, so pair it with --eval-tokens > 0; heldout.json stays in
  the folder and the JSON); with --bench also `saescope bench-sae` (sae_core.evaluation, when present) for each seed in
  --bench-seeds.
Prints the table (app/compare.py's, the one the page shows) and, per architecture and L0, each metric's
mean and spread (max - min) over the training seeds; --json writes everything.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ALL_ARCHS = ["topk", "batchtopk", "jumprelu", "matryoshka_batchtopk"]
METRICS = ["l0", "fvu", "fvu_batch_topk", "ce_score", "delta_ce", "kl", "dead_fraction"]  # eval.json / heldout.json fields
JUMPRELU_TOLERANCE = 0.2  # relative L0 miss that makes the first seed train again with new settings
JUMPRELU_ROUNDS = 3  # such retrainings at most
FALLBACK_L0_COEF = {16: 4e-3, 32: 2e-3, 64: 7e-4}  # without TopK runs in the sweep: ~TopK's slope on the demo cache


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", type=Path, help="the activation cache (required unless --report)")
    p.add_argument("--report", type=Path, default=None, help="print the tables of an earlier --json (e.g. the GPU sweep's) and stop")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "arch_sweep")
    p.add_argument("--archs", default=",".join(ALL_ARCHS))
    p.add_argument("--l0", default="16,32,64")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--n-latents", type=int, default=8192)
    p.add_argument("--tokens", type=int, default=262_144, help="training tokens per run")
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate of every run (default: the trainer's, 2e-4 / sqrt(n / 2^14))")
    p.add_argument("--eval-tokens", type=int, default=4096, help="held-out corpus tokens of `saescope eval`; 0: no model evaluation")
    p.add_argument(
        "--holdout-shards",
        type=int,
        default=0,
        help="train on the cache without its last N shards and measure FVU, L0 and dead latents on those (no model needed)",
    )
    p.add_argument("--eval-probes", action="store_true", help="also the probe loss (Gao et al. §4) in each eval")
    p.add_argument("--device", default="auto")
    p.add_argument("--model-dtype", default="auto")
    p.add_argument("--store", default=None, help="mine each SAE into this store (URL) for /compare")
    p.add_argument("--mine-tokens", type=int, default=16384)
    p.add_argument("--bench", action="store_true", help="run saescope bench-sae on each mined SAE (needs --store)")
    p.add_argument("--bench-seeds", default="0")
    p.add_argument("--name-prefix", default="sweep", help="SAE names in the store: <prefix>-<arch>-L<l0>-s<seed>")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--budget-s", type=float, default=None, help="start no new training after this many seconds")
    return p.parse_args(argv)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def trained(folder: Path) -> bool:
    return (folder / "cfg.json").exists() and (folder / "sae_weights.safetensors").exists()


def init_threshold(cache, n_latents: int, l0: int, seed: int = 0) -> float:
    """The one threshold at which `l0` latents per token fire at the trainer's tied init (random unit decoder
    rows, W_enc = W_dec, b_pre at the geometric median of the scaled inputs), on a sample of the cache."""
    import torch

    from sae_core.train import estimate_scale, geometric_median

    x = cache.sample(4096, seed=seed)
    x = x[torch.isfinite(x).all(1)]
    x = x * estimate_scale(x)
    b = geometric_median(x[:4096])
    W = torch.nn.functional.normalize(torch.randn(n_latents, x.shape[1], generator=torch.Generator().manual_seed(seed)), dim=1)
    pre = (x[:2048] - b) @ W.T
    return float(pre.flatten().topk(l0 * len(pre)).values.min())


def threshold_factor(sae_dir: Path, cache, l0: int) -> tuple[float, float]:
    """(factor on every threshold of the trained JumpReLU SAE that gives L0 = l0 on a cache sample, its L0 now)."""
    import torch

    from sae_core.interchange import load_sae

    sae = load_sae(sae_dir).sae
    x = cache.sample(2048, seed=123)
    with torch.no_grad():
        pre, thr = sae.pre_activations(x), sae.activation_thresholds()

        def l0_at(f: float) -> float:
            return float((pre > thr * f).sum(1).float().mean())

        now = l0_at(1.0)
        lo, hi = math.log(1e-3), math.log(1e3)
        for _ in range(40):
            mid = (lo + hi) / 2
            if l0_at(math.exp(mid)) > l0:
                lo = mid
            else:
                hi = mid
    return math.exp((lo + hi) / 2), now


def share_held_out_windows() -> None:
    """Every SAE of the sweep is evaluated on the same held-out windows of the same corpus (same cache, so the
    same trained windows and seed): open the corpus and tokenize its windows once, not once per SAE (under
    load that tokenizing took 100-200 s of each evaluation here)."""
    import functools

    from sae_core import corpus as corpus_mod

    opened = functools.lru_cache(maxsize=4)(corpus_mod.open_corpus)
    windows: dict[tuple, list] = {}
    spread = corpus_mod.spread_windows

    def shared(corpus, tokenizer, context_size, seed, start, n, stride):
        key = (id(corpus), context_size, seed, start, n, stride)
        if key not in windows:
            windows[key] = list(spread(corpus, tokenizer, context_size, seed, start, n, stride))
        return iter(windows[key])

    corpus_mod.open_corpus = opened  # sae_core.evaluate calls both through the module
    corpus_mod.spread_windows = shared


def split_cache(cache_dir: Path, out: Path, holdout: int) -> tuple[Path, list[Path]]:
    """A view of the cache without its last `holdout` shards (links to the others, its manifest cut to their
    windows) for training, and the held-out shard files."""
    shards = sorted(cache_dir.glob("shard_*.safetensors"))
    if holdout >= len(shards):
        raise SystemExit(f"--holdout-shards {holdout}: the cache has only {len(shards)} shards")
    train_dir = out / "train-cache"
    train_dir.mkdir(parents=True, exist_ok=True)
    manifest = json.loads((cache_dir / "cache.json").read_text())
    per_shard = manifest["config"]["windows_per_shard"]
    kept = shards[: len(shards) - holdout]
    for f in kept:
        link = train_dir / f.name
        if not link.exists():
            link.symlink_to(f.resolve())
    for extra in ("documents.json",):
        if (cache_dir / extra).exists() and not (train_dir / extra).exists():
            (train_dir / extra).symlink_to((cache_dir / extra).resolve())
    manifest["n_windows"] = min(manifest["n_windows"], per_shard * len(kept))
    (train_dir / "cache.json").write_text(json.dumps(manifest))
    return train_dir, shards[len(kept) :]


BATCH_TOPK = ("batchtopk", "matryoshka_batchtopk")  # trained with a batch-level top-k, served with a threshold


def heldout_eval(folder: Path, shards: list[Path], batch_k: int | None = None) -> dict:
    """FVU (as saescope eval defines it), L0 and the share of latents that never fired, on the held-out shards'
    activations (raw: the saved SAE takes raw activations). With `batch_k` (BatchTopK and Matryoshka) also
    the FVU of the code they are trained with, the batch_k x rows largest positive pre-activations of each
    4,096-row batch (L0 = batch_k exactly), beside the served code's (the learnt threshold's): a threshold
    estimated over few steps can put the served L0 far from k."""
    import torch
    from safetensors.torch import load_file

    from sae_core.interchange import load_sae

    sae = load_sae(folder).sae
    n, active, sq_err, sum_sq, sq_err_batch = 0, 0, 0.0, 0.0, 0.0
    sum_x = None
    fired = None
    with torch.no_grad():
        for shard in shards:
            acts = load_file(str(shard))["activations"]
            for x in acts.split(4096):
                x = x.float()
                x = x[torch.isfinite(x).all(1)]
                z = sae.encode(x)
                x_hat = sae.decode(z) if hasattr(sae, "decode") else sae(x)
                fired = (z > 0).sum(0) if fired is None else fired + (z > 0).sum(0)
                active += int((z > 0).sum())
                sq_err += float((x - x_hat).double().pow(2).sum())
                sum_sq += float(x.double().pow(2).sum())
                sum_x = x.double().sum(0) if sum_x is None else sum_x + x.double().sum(0)
                n += len(x)
                if batch_k is not None:
                    pre = sae.pre_activations(x).clamp_min(0)
                    flat = pre.flatten()
                    top = flat.topk(batch_k * len(x))
                    z_b = torch.zeros_like(flat).scatter_(0, top.indices, top.values).view_as(pre)
                    sq_err_batch += float((x - sae.decode(z_b)).double().pow(2).sum())
    assert sum_x is not None and fired is not None
    total_var = sum_sq - float(sum_x.pow(2).sum()) / n
    out = {"tokens": n, "l0": active / n, "fvu": sq_err / total_var, "dead_fraction": float((fired == 0).float().mean())}
    if batch_k is not None:
        out.update(fvu_batch_topk=sq_err_batch / total_var, l0_batch_topk=float(batch_k))
    return out


def topk_slopes(results: list[dict], l0s: list[int]) -> dict[int, float]:
    """TopK's marginal FVU per active latent at each L0, from this sweep's TopK runs (mean over seeds)."""
    fvu: dict[int, float] = {}
    for l0 in l0s:
        vals = [r["eval"]["fvu"] for r in results if r["architecture"] == "topk" and r["target_l0"] == l0 and "fvu" in r["eval"]]
        if vals:
            fvu[l0] = sum(vals) / len(vals)
    known = sorted(fvu)
    slopes = {}
    for l0 in l0s:
        below = [a for a in known if a < l0]
        above = [a for a in known if a > l0]
        pairs = []
        if below:
            pairs.append((below[-1], l0 if l0 in fvu else None))
        if above:
            pairs.append((l0 if l0 in fvu else None, above[0]))
        vals = [(fvu[a] - fvu[b]) / (b - a) for a, b in pairs if a is not None and b is not None and a in fvu and b in fvu]
        vals = [v for v in vals if v > 0]
        if vals:
            slopes[l0] = math.exp(sum(math.log(v) for v in vals) / len(vals))  # geometric mean of the two sides
    return slopes


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.report is not None:
        saved = json.loads(args.report.read_text())
        calibration = {int(k): v for k, v in saved.get("calibration", {}).items()}
        args.json = None
        report(args, saved["runs"], calibration, saved.get("stored", False), saved.get("wall_s", 0.0))
        return 0
    if args.cache is None:
        raise SystemExit("--cache is required (or --report)")
    import torch

    from sae_core.cache import ActivationCache
    from sae_core.config import EvalConfig, TrainConfig
    from sae_core.evaluate import evaluate
    from sae_core.model import load_model
    from sae_core.train import train

    archs, l0s, seeds = args.archs.split(","), [int(v) for v in args.l0.split(",")], [int(v) for v in args.seeds.split(",")]
    # TopK first: JumpReLU's calibration reads it
    archs = sorted(archs, key=lambda a: (a != "topk", ALL_ARCHS.index(a) if a in ALL_ARCHS else 99))
    train_cache, heldout = (args.cache, []) if not args.holdout_shards else split_cache(args.cache, args.out, args.holdout_shards)
    cache = ActivationCache(train_cache)
    share_held_out_windows()
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    results: list[dict] = []
    calibration: dict[int, dict] = {}
    lm = None
    log(f"sweep: {archs} x L0 {l0s} x seeds {seeds}, {args.n_latents} latents, {args.tokens:,} tokens per run (batch {args.batch_size}), "
        f"eval {args.eval_tokens:,} tokens; torch threads {torch.get_num_threads()}")  # fmt: skip

    def eval_one(folder: Path, arch: str, l0: int) -> dict:
        nonlocal lm
        if heldout:
            path = folder / "heldout.json"
            batch_k = l0 if arch in BATCH_TOPK else None
            if not path.exists() or (batch_k is not None and "fvu_batch_topk" not in json.loads(path.read_text())):
                path.write_text(json.dumps(heldout_eval(folder, heldout, batch_k)))
            measured = json.loads(path.read_text())
            if not args.eval_tokens:
                return measured
            extra_keys = {f"heldout_{k}": v for k, v in measured.items()}
        else:
            extra_keys = {}
        path = folder / "eval.json"
        if not path.exists():
            cfg = EvalConfig(tokens=args.eval_tokens, probe_per_class=512 if args.eval_probes else 0, ablation_positions=0,
                             device=args.device, model_dtype=args.model_dtype)  # fmt: skip
            if lm is None:
                t = time.time()
                model_name = json.loads((args.cache / "cache.json").read_text())["config"]["model"]
                lm = load_model(model_name, args.device, args.model_dtype)
                log(f"model loaded in {time.time() - t:.0f} s")
            evaluate(folder, cfg, lm=lm, progress=False)
        return {**json.loads(path.read_text()), **extra_keys}

    def run_one(arch: str, l0: int, seed: int, extra: dict) -> dict:
        folder = args.out / f"{arch}-L{l0}-s{seed}"
        t = time.time()
        fresh = not trained(folder)
        if fresh:
            if folder.exists():
                import shutil

                shutil.rmtree(folder)
            cfg = TrainConfig(architecture=arch, n_latents=args.n_latents, k=l0, batch_size=args.batch_size, tokens=args.tokens,
                              seed=seed, device=args.device, lr=args.lr, **extra)  # fmt: skip
            res = train(cfg, train_cache, folder, progress=False)
            train_s, tok_s, final = time.time() - t, res.tokens_per_s, res.final
        else:
            meta = json.loads((folder / "cfg.json").read_text())["metadata"]["saescope"]["training"]
            train_s, tok_s, final = None, None, meta.get("final", {})
        t2 = time.time()
        ev = eval_one(folder, arch, l0)
        row = {"name": f"{args.name_prefix}-{arch}-L{l0}-s{seed}", "folder": str(folder), "architecture": arch, "target_l0": l0,
               "seed": seed, "n_latents": args.n_latents, "k": None if arch == "jumprelu" else l0, "settings": extra,
               "train_s": train_s, "train_tokens_per_s": tok_s, "eval_s": time.time() - t2, "train_final": final, "eval": ev}  # fmt: skip
        ce = f", CE recovered {ev['ce_score']:.4f}" if "ce_score" in ev else ""
        log(f"{arch} L0 {l0} seed {seed}: FVU {ev['fvu']:.4f}, L0 {ev['l0']:.1f}{ce}, dead {ev['dead_fraction']:.4f}"
            + (f" (trained in {train_s:.0f} s at {tok_s:,.0f} tok/s" if train_s else " (reused")
            + f", eval {row['eval_s']:.0f} s)")  # fmt: skip
        return row

    def calibrate(l0: int) -> dict:
        """JumpReLU's settings at this L0 (see the module doc), kept on disk so a resumed sweep reuses them."""
        saved = args.out / f"jumprelu-L{l0}.calibration.json"
        if l0 not in calibration:
            if saved.exists():
                calibration[l0] = json.loads(saved.read_text())
            else:
                slope = topk_slopes(results, l0s).get(l0)
                calibration[l0] = {"l0_coef": slope if slope is not None else FALLBACK_L0_COEF.get(l0, 2e-3 * 32 / l0),
                                   "l0_coef_from": "topk slope" if slope is not None else "fallback",
                                   "init_threshold": init_threshold(cache, args.n_latents, l0), "recalibrated": False}  # fmt: skip
        saved.write_text(json.dumps(calibration[l0]))
        return {"l0_coef": calibration[l0]["l0_coef"], "init_threshold": calibration[l0]["init_threshold"]}

    # seeds outermost: a sweep cut short by --budget-s has every cell of the first seed
    for seed in seeds:
        for arch in archs:
            for l0 in l0s:
                folder = args.out / f"{arch}-L{l0}-s{seed}"
                if args.budget_s is not None and time.time() - started > args.budget_s and not trained(folder):
                    log(f"budget spent: {arch} L0 {l0} seed {seed} not trained")
                    continue
                extra = calibrate(l0) if arch == "jumprelu" else {}
                row = run_one(arch, l0, seed, extra)
                if arch == "jumprelu" and not calibration[l0]["recalibrated"]:
                    calibration[l0]["recalibrated"] = True  # calibrated once, on the first seed
                    rounds = calibration[l0].setdefault("rounds", [])
                    while abs(row["eval"]["l0"] / l0 - 1) > JUMPRELU_TOLERANCE and len(rounds) < JUMPRELU_ROUNDS:
                        # the start rescaled to where the trained SAE would fire l0 latents, and the penalty in
                        # proportion to the miss (too few latents: a weaker penalty)
                        factor, _ = threshold_factor(folder, cache, l0)
                        ratio = min(4.0, max(0.25, row["eval"]["l0"] / l0))
                        c = calibration[l0]
                        rounds.append({"l0": row["eval"]["l0"], "fvu": row["eval"]["fvu"], "l0_coef": c["l0_coef"],
                                       "init_threshold": c["init_threshold"]})  # fmt: skip
                        c.update(init_threshold=c["init_threshold"] * factor, l0_coef=c["l0_coef"] * ratio)
                        extra = calibrate(l0)
                        log(f"jumprelu L0 {l0}: seed {seed} reached L0 {row['eval']['l0']:.1f}; start x{factor:.3f} -> "
                            f"{extra['init_threshold']:.4g}, coefficient x{ratio:.2f} -> {extra['l0_coef']:.3g}; again")  # fmt: skip
                        import shutil

                        shutil.rmtree(folder)
                        row = run_one(arch, l0, seed, extra)
                    calibrate(l0)
                results.append(row)
                if args.json:  # partial results survive a sweep killed at its time limit
                    args.json.parent.mkdir(parents=True, exist_ok=True)
                    args.json.write_text(json.dumps({"partial": True, "runs": results}, indent=1))

    stored = False
    if args.store and results:
        stored = store_and_bench(args, results, lm)

    report(args, results, calibration, stored, time.time() - started)
    return 0


def store_and_bench(args, results: list[dict], lm) -> bool:
    """Mine each SAE into --store (and with --bench run the benchmark suite on it); attach the bench runs."""
    from sae_core.config import MineConfig
    from sae_core.mine import mine

    for r in results:
        t = time.time()
        mine(r["folder"], MineConfig(tokens=args.mine_tokens, name=r["name"], db=args.store, device=args.device,
                                     model_dtype=args.model_dtype), lm=lm, progress=False)  # fmt: skip
        log(f"mined {r['name']} in {time.time() - t:.0f} s")
        if args.bench:
            try:
                from sae_core.evaluation.config import BenchConfig
                from sae_core.evaluation.suite import run_suite
                from sae_core.store import db
                from sae_core.store.benchmarks import save_benchmark
            except ImportError as exc:
                log(f"no benchmark suite here ({exc}); skipping --bench")
                args.bench = False
                continue
            engine = db.open_store(args.store)
            r["bench_runs"] = []
            for seed in [int(s) for s in args.bench_seeds.split(",")]:
                t = time.time()
                res, _ = run_suite(BenchConfig(sae=r["name"], seed=seed, db=args.store, device=args.device, model_dtype=args.model_dtype),
                                   lm=lm, progress=False, engine=engine)  # fmt: skip
                save_benchmark(engine, res.stored())
                r["bench_runs"].append({"seed": seed, "metrics": res.metrics, "absorption_valid": res.absorption_valid})
                log(f"bench-sae {r['name']} seed {seed} in {time.time() - t:.0f} s")
    return True


def spread_rows(results: list[dict]) -> list[dict]:
    """Per (architecture, target L0): each metric's mean and spread (max - min) over training seeds."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in results:
        groups.setdefault((r["architecture"], r["target_l0"]), []).append(r)
    rows = []
    for (arch, l0), rs in groups.items():
        row = {"architecture": arch, "target_l0": l0, "seeds": [r["seed"] for r in rs]}
        for key in METRICS:
            vals = [r["eval"][key] for r in rs if key in r["eval"]]
            if vals:
                row[key] = {"mean": sum(vals) / len(vals), "spread": max(vals) - min(vals), "values": vals}
        rows.append(row)
    return rows


def report(args, results: list[dict], calibration: dict, stored: bool, wall: float) -> None:
    comp = None
    try:  # the page's own table; app/ needs fastapi, which a bare GPU image may lack (the JSON is enough there)
        from app.compare import comparison, markdown_table
    except ImportError as exc:
        print(f"(no /compare table here: {exc}; `python bench/arch_sweep.py --report JSON` prints it where the app runs)")
    else:

        def numbers(d: dict) -> dict:
            return {k: v for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}

        data = {"model": "", "hook": "", "saes": [
            {"name": r["name"], "architecture": r["architecture"], "n_latents": r["n_latents"], "k": r["k"], "d_in": 0,
             "train_seed": r["seed"], "eval": numbers(r["eval"]), "bench_runs": r.get("bench_runs", [])} for r in results]}  # fmt: skip
        comp = comparison(data)
        print("\n## Per SAE (the /compare table)\n")
        print(markdown_table(comp))
    spreads = spread_rows(results)
    print("\n## Per architecture and L0: mean over training seeds, ± half the spread (max - min)\n")
    head = ["architecture", "target L0"] + METRICS
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for row in spreads:
        cells = [row["architecture"], str(row["target_l0"])]
        for key in METRICS:
            c = row.get(key)
            cells.append("–" if c is None else f"{c['mean']:.4g} ± {c['spread'] / 2:.2g}")
        print("| " + " | ".join(cells) + " |")
    if calibration:
        parts = []
        for l0, c in sorted(calibration.items()):
            text = f"L0 {l0}: coefficient {c['l0_coef']:.3g} ({c['l0_coef_from']}), thresholds from {c['init_threshold']:.4g}"
            for i, r in enumerate(c.get("rounds", [])):
                text += f"; try {i + 1}: coefficient {r['l0_coef']:.3g}, start {r['init_threshold']:.4g} -> L0 {r['l0']:.1f}"
            parts.append(text)
        print("\nJumpReLU calibration: " + "; ".join(parts))
    print(f"\nwall {wall:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "runs": results, "spreads": spreads,
                                         "calibration": {str(k): v for k, v in calibration.items()}, "comparison": comp,
                                         "stored": stored, "wall_s": wall}, indent=1))  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
