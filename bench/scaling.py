"""Scaling of TopK SAEs on the bundled model: the shapes of Gao et al. 2024, Figures 1-2 (results in bench/RESULTS.md).

    python bench/scaling.py [--cache-tokens 2000000] [--train-tokens 2000000] [--layer 8] [--activations CACHE]

1. Cache --cache-tokens activations of blocks.{layer} with saescope's own resumable cache
   (bench/out/scaling/cache; `saescope cache` with the same options fills the same folder), or train
   from an existing cache (--activations, read only).
2. Held-out set: the --heldout-tokens positions right after the cached windows (never trained on).
3. Runs, each saved under bench/out/scaling/runs/<name> with result.json; a re-run skips finished ones:
   - TopK grid: n in {1024, 2048, 4096, 8192, 16384} x k in {8, 16, 32, 64};
   - ReLU + L1 at n = --relu-n for a sweep of L1 coefficients (the paper's baseline);
   - n = 16384, k = 32 without AuxK and tied init, beside the grid's run with both (dead latents).
4. Held-out FVU and L0 per run; FVU = c * n^-alpha fitted per k (least squares in log-log), with the
   local exponent between neighbouring n (equal under one power law); writes
   bench/out/scaling/{fvu_vs_n,fvu_vs_l0,dead_latents}.png and results.md (also printed).
5. The paper's feature-quality metrics per run (§4.2 probe loss, §4.5 ablation sparsity; sae_core/metrics,
   the code `saescope eval` runs, on the same held-out windows): probe loss over the corpus's labelled
   tasks and the ablation sparsity of --ablation-positions positions; plotted against n
   (quality_vs_n.png). --no-quality skips them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
OUT = ROOT / "bench" / "out" / "scaling"
NS = (1024, 2048, 4096, 8192, 16384)
KS = (8, 16, 32, 64)


def held_out(cache_dir: Path, tokens: int, out: Path, lm=None) -> dict[str, torch.Tensor]:
    """Activations of the windows that follow the cached ones, in the cache's corpus order: x [positions, d]
    (the skipped positions dropped), each position's doc_index and doc_offset (for the probe tasks' labels),
    and the windows' tokens [windows, context] (for the ablations)."""
    from safetensors.torch import load_file, save_file

    from sae_core import corpus as corpus_mod
    from sae_core.cache import ActivationCache
    from sae_core.model import load_model, parse_hook

    if out.exists() and {"x", "doc_index", "doc_offset", "tokens"} <= set(held := load_file(out)):
        return held
    cache = ActivationCache(cache_dir)
    cfg = cache.config
    lm = lm or load_model(cfg["model"], "auto", "auto")
    layer, skip, context = parse_hook(cfg["hook"]), cfg["skip_positions"], cfg["context_size"]
    windows = corpus_mod.iter_windows(corpus_mod.open_corpus(cfg["corpus"]), lm.tokenizer, context, cfg["seed"],
                                      skip_windows=cache.manifest["n_windows"])
    rows, docs, offsets, ids_kept, need = [], [], [], [], -(-tokens // (context - skip))
    with torch.inference_mode():
        while need > 0:
            batch = [w for _, w in zip(range(min(32, need)), windows)]
            if not batch:
                break
            ids = torch.from_numpy(np.concatenate([w.tokens for w in batch])).long()
            rows.append(lm.residuals(ids.to(lm.device), layer)[:, skip:].float().reshape(-1, lm.d_model).cpu())
            docs.append(torch.from_numpy(np.concatenate([w.doc_index for w in batch])[:, skip:].reshape(-1)))
            offsets.append(torch.from_numpy(np.concatenate([w.doc_offset for w in batch])[:, skip:].reshape(-1)))
            ids_kept.append(ids)
            need -= len(batch)
    held = {"x": torch.cat(rows)[:tokens].contiguous(), "doc_index": torch.cat(docs)[:tokens].contiguous(),
            "doc_offset": torch.cat(offsets)[:tokens].contiguous(), "tokens": torch.cat(ids_kept).contiguous()}
    save_file(held, out)
    return held


class Quality:
    """The feature-quality metrics of every run on the same held-out windows: the labelled positions are
    collected once, the ablation windows' residuals computed once; each SAE is then scored by the code
    `saescope eval` runs (sae_core/metrics)."""

    def __init__(self, cache_dir: Path, held: dict[str, torch.Tensor], lm, per_class: int, positions: int, horizon: int):
        from sae_core import corpus as corpus_mod
        from sae_core.cache import ActivationCache
        from sae_core.metrics.labels import TokenLabeller
        from sae_core.metrics.probe import ProbeCollector
        from sae_core.model import parse_hook

        cfg = ActivationCache(cache_dir).config
        self.lm, self.layer, self.skip = lm, parse_hook(cfg["hook"]), cfg["skip_positions"]
        self.positions, self.horizon = positions, horizon
        self.probes = ProbeCollector(TokenLabeller(corpus_mod.open_corpus(cfg["corpus"]), lm.tokenizer), per_class, cfg["seed"])
        self.probes.add(held["doc_index"].numpy(), held["doc_offset"].numpy(), held["x"])
        self.ids = held["tokens"][:positions].to(lm.device)  # one ablated position per window, as in saescope eval
        with torch.inference_mode():
            self.h = lm.residuals(self.ids, self.layer)
        from sae_core.metrics.ablation import float32_model

        self.lm = float32_model(lm)  # the ablations run in float32: one copy for every run

    def __call__(self, sae_dir: Path, candidates: int) -> dict:
        from sae_core.interchange import load_sae
        from sae_core.metrics.ablation import AblationMeter

        sae = load_sae(sae_dir).sae.to(self.lm.device)
        t0 = time.perf_counter()
        probe = self.probes.fit(sae, candidates)
        t1 = time.perf_counter()
        meter = AblationMeter(self.lm, sae, self.layer, self.skip, self.positions, self.horizon)
        meter.add(self.ids, self.h)
        ablation = meter.report()
        return {"probe_loss": probe.loss if probe else None,
                "probe_tasks": [{"name": t.name, "loss": t.loss, "latent": t.latent, "per_class": t.per_class}
                                for t in probe.tasks] if probe else [],
                "ablation_sparsity": ablation.sparsity if ablation else None, "ablations": ablation.ablations if ablation else 0,
                "quality_seconds": {"probe": round(t1 - t0, 1), "ablation": round(time.perf_counter() - t1, 1)}}


@torch.no_grad()
def measure(sae_dir: Path, x: torch.Tensor) -> dict:
    """Held-out FVU (sae_core.sae.topk.fvu's definition, summed over chunks), L0, and the share of
    latents that never fire on the held-out set."""
    from sae_core.interchange import load_sae

    sae, _ = load_sae(sae_dir)
    err = tot = 0.0
    active, fired = 0, torch.zeros(sae.cfg.n_latents, dtype=torch.bool)
    mean = x.mean(0)
    for chunk in x.split(4096):
        z = sae.encode(chunk)
        x_hat = sae(chunk)
        err += float((chunk - x_hat).pow(2).sum())
        tot += float((chunk - mean).pow(2).sum())
        active += int((z > 0).sum())
        fired |= (z > 0).any(0)
    return {"fvu": err / tot, "l0": active / len(x), "heldout_never_fired": float((~fired).float().mean())}


def run(name: str, cfg, cache_dir: Path, x: torch.Tensor, quality: Quality | None = None, candidates: int = 128) -> dict:
    from sae_core.train import train

    out = OUT / "runs" / name
    done = out / "result.json"
    if done.exists():
        row = json.loads(done.read_text())
    else:
        t0 = time.perf_counter()
        result = train(cfg, cache_dir, out, resume=(out / "checkpoint.pt").exists(), progress=False)
        row = {"name": name, "architecture": cfg.architecture, "n": cfg.n_latents,
               "k": cfg.k if cfg.architecture == "topk" else None, "l1": cfg.l1_coef if cfg.architecture == "relu" else None,
               "auxk": cfg.aux_coef > 0, "tied_init": cfg.tied_init, "train_tokens": result.tokens,
               "dead_fraction": result.final.get("dead_fraction"), "train_fvu": result.final.get("fvu"),
               "seconds": round(time.perf_counter() - t0, 1), **measure(out, x)}
    if quality is not None and "probe_loss" not in row:  # runs finished before the metrics existed gain them
        row.update(quality(out, candidates))
    done.write_text(json.dumps(row, indent=2))
    return row


def power_law(ns, fvus) -> tuple[float, float]:
    """FVU = c * n^-alpha by least squares on log FVU; returns (alpha, c)."""
    slope, intercept = np.polyfit(np.log(ns), np.log(fvus), 1)
    return -slope, float(np.exp(intercept))


def local_exponents(ns, fvus) -> list[float]:
    """The exponent between each pair of neighbouring n: one power law has them all equal; a shrinking
    one at the wide end says those SAEs are not yet trained to convergence."""
    return [-float(np.log(f2 / f1) / np.log(n2 / n1)) for (n1, f1), (n2, f2) in zip(zip(ns, fvus), zip(ns[1:], fvus[1:]))]


def plots(rows: list[dict], relu_n: int) -> dict[str, str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths, fits = {}, {}

    def save(fig, ax, name: str, **labels) -> None:
        ax.set(**labels)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        fig.tight_layout()
        paths[name] = str(OUT / f"{name}.png")
        fig.savefig(paths[name], dpi=120)

    grid = [r for r in rows if r["architecture"] == "topk" and r["auxk"] and r["tied_init"]]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for k in KS:
        pts = sorted((r["n"], r["fvu"]) for r in grid if r["k"] == k)
        if len(pts) < 2:
            continue
        ns, fv = zip(*pts)
        alpha, c = power_law(ns, fv)
        fits[k] = (alpha, c, local_exponents(ns, fv))
        line, = ax.plot(ns, fv, "o", label=f"k={k}: FVU ~ n^{-alpha:.3f}")
        grid_n = np.geomspace(min(ns), max(ns), 50)
        ax.plot(grid_n, c * grid_n ** -alpha, "-", color=line.get_color(), alpha=0.6)
    save(fig, ax, "fvu_vs_n", xscale="log", yscale="log", xlabel="latents n", ylabel="held-out FVU", title="TopK: FVU vs n (power-law fits)")

    fig, ax = plt.subplots(figsize=(6, 4.5))
    topk = sorted((r["l0"], r["fvu"]) for r in grid if r["n"] == relu_n)
    relu = sorted((r["l0"], r["fvu"], r["l1"]) for r in rows if r["architecture"] == "relu")
    if topk:
        ax.plot(*zip(*topk), "o-", label=f"TopK, n={relu_n}")
    if relu:
        ax.plot([r[0] for r in relu], [r[1] for r in relu], "s--", label=f"ReLU + L1, n={relu_n}")
        for l0, fv, l1 in relu:
            ax.annotate(f"l1={l1:g}", (l0, fv), fontsize=7, xytext=(3, 3), textcoords="offset points")
    save(fig, ax, "fvu_vs_l0", xscale="log", yscale="log", xlabel="held-out L0", ylabel="held-out FVU",
         title="FVU vs L0: TopK against ReLU + L1")

    fig, ax = plt.subplots(figsize=(6, 4))
    ablation = sorted((r for r in rows if r["architecture"] == "topk" and r["n"] == max(NS) and r["k"] == 32),
                      key=lambda r: (r["auxk"], r["tied_init"]))
    labels = [("AuxK + tied init" if r["auxk"] and r["tied_init"] else "neither" if not r["auxk"] and not r["tied_init"]
               else f"AuxK {'on' if r['auxk'] else 'off'}, tied {'on' if r['tied_init'] else 'off'}") for r in ablation]
    ax.bar(labels, [100 * r["dead_fraction"] for r in ablation])
    save(fig, ax, "dead_latents", ylabel="dead latents at the end of training (%)", title=f"Dead latents, n={max(NS)}, k=32")

    for metric, label, title in (("probe_loss", "probe loss (nats; chance ln 2)", "§4.2: best single-latent probe, mean over tasks"),
                                 ("ablation_sparsity", "ablation sparsity (L1/L2)^2 / (V T)", "§4.5: sparsity of ablation effects")):
        scored = [r for r in rows if r.get(metric) is not None]
        if not scored:
            continue
        fig, ax = plt.subplots(figsize=(6, 4.5))
        for k in KS:
            pts = sorted((r["n"], r[metric]) for r in scored if r in grid and r["k"] == k)
            if pts:
                ax.plot(*zip(*pts), "o-", label=f"TopK k={k}")
        relu_pts = sorted((r["n"], r[metric], r["l1"]) for r in scored if r["architecture"] == "relu")
        for n, value, l1 in relu_pts:
            ax.plot([n], [value], "s", color="black")
            ax.annotate(f"ReLU l1={l1:g}", (n, value), fontsize=7, xytext=(3, 3), textcoords="offset points")
        save(fig, ax, f"{metric}_vs_n", xscale="log", xlabel="latents n", ylabel=label, title=title)
    plt.close("all")
    return paths, fits


def _num(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}"


def main() -> None:
    global OUT, NS, KS      # --out, --ns and --ks replace the defaults for every helper here
    from sae_core.cache import CacheConfig, build_cache
    from sae_core.train import TrainConfig

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache-tokens", type=int, default=2_000_000)
    ap.add_argument("--train-tokens", type=int, default=None, help="tokens per run (default: one pass over the cache)")
    ap.add_argument("--heldout-tokens", type=int, default=65_536)
    ap.add_argument("--layer", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=1024, help="tokens per step (more steps for a small budget)")
    ap.add_argument("--relu-n", type=int, default=4096)
    ap.add_argument("--ns", type=int, nargs="+", default=list(NS), help="latent counts of the TopK grid")
    ap.add_argument("--ks", type=int, nargs="+", default=list(KS), help="k values of the TopK grid")
    ap.add_argument("--out", type=Path, default=OUT, help="cache, runs, plots and results.md go here")
    ap.add_argument("--l1", type=float, nargs="+", default=[3e-2, 1e-1, 3e-1, 1.0], help="ReLU sweep's L1 coefficients")
    ap.add_argument("--grid-only", action="store_true", help="only the TopK grid: no ReLU sweep, no run without the mitigations")
    ap.add_argument("--skip-unmitigated", action="store_true", help="no run without AuxK and tied init")
    ap.add_argument("--activations", type=Path, default=None, help="train from this existing cache (read only) instead of --out/cache")
    ap.add_argument("--no-quality", action="store_true", help="skip the probe loss and the ablation sparsity")
    ap.add_argument("--probe-per-class", type=int, default=2048, help="held-out tokens per class of each probe task")
    ap.add_argument("--probe-candidates", type=int, default=128, help="latents fitted per probe task (0: every latent)")
    ap.add_argument("--ablation-positions", type=int, default=32, help="positions whose active latents are ablated")
    ap.add_argument("--ablation-horizon", type=int, default=16, help="logit positions compared per ablation (the paper's T)")
    args = ap.parse_args()
    OUT, NS, KS = args.out, tuple(args.ns), tuple(args.ks)

    if args.activations is not None:
        from sae_core.cache import ActivationCache

        cache_dir = args.activations
        args.cache_tokens = ActivationCache(cache_dir).config["tokens"]
    else:
        cache_dir = OUT / "cache"
        build_cache(CacheConfig(hook=f"blocks.{args.layer}.hook_resid_post", tokens=args.cache_tokens), cache_dir)
    lm, quality = None, None
    if not args.no_quality:
        from sae_core.cache import ActivationCache
        from sae_core.model import load_model

        lm = load_model(ActivationCache(cache_dir).config["model"], "auto", "auto")
    OUT.mkdir(parents=True, exist_ok=True)
    held = held_out(cache_dir, args.heldout_tokens, OUT / f"heldout-{args.heldout_tokens}.safetensors", lm)
    x = held["x"]
    if lm is not None:
        quality = Quality(cache_dir, held, lm, args.probe_per_class, args.ablation_positions, args.ablation_horizon)
    common = dict(tokens=args.train_tokens, batch_size=args.batch_size, checkpoint_every=100)

    plan = [(f"topk-n{n}-k{k}", TrainConfig(n_latents=n, k=k, **common)) for n in NS for k in KS]
    if not args.grid_only:
        plan += [(f"relu-n{args.relu_n}-l1-{l1:g}", TrainConfig(architecture="relu", n_latents=args.relu_n, l1_coef=l1, **common))
                 for l1 in args.l1]
        if not args.skip_unmitigated:
            plan += [(f"topk-n{max(NS)}-k32-no-auxk-no-tied",
                      TrainConfig(n_latents=max(NS), k=32, aux_coef=0.0, tied_init=False, **common))]
    rows = []
    for i, (name, cfg) in enumerate(plan, 1):
        row = run(name, cfg, cache_dir, x, quality, args.probe_candidates)
        rows.append(row)
        print(f"[{i}/{len(plan)}] {name}: FVU {row['fvu']:.4f}  L0 {row['l0']:.1f}  dead {100 * (row['dead_fraction'] or 0):.1f}%  "
              f"probe {_num(row.get('probe_loss'))}  ablation {_num(row.get('ablation_sparsity'))}  ({row['seconds']:.0f} s)", flush=True)

    paths, fits = plots(rows, args.relu_n)
    lines = [f"Cache: {args.cache_tokens:,} tokens of blocks.{args.layer}; held-out: {len(x):,} positions after them; "
             f"{rows[0]['train_tokens']:,} training tokens per run, batch {args.batch_size}.", "",
             "| run | n | k / L1 | held-out FVU | held-out L0 | dead at end | never fired (held-out) | probe loss | ablation sparsity "
             "| train s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        kl = f"k={r['k']}" if r["k"] else f"l1={r['l1']:g}"
        tag = "" if r["auxk"] and r["tied_init"] else " (no AuxK, no tied init)"
        lines.append(f"| {r['architecture']}{tag} | {r['n']} | {kl} | {r['fvu']:.4f} | {r['l0']:.1f} | "
                     f"{100 * (r['dead_fraction'] or 0):.1f}% | {100 * r['heldout_never_fired']:.1f}% | {_num(r.get('probe_loss'))} | "
                     f"{_num(r.get('ablation_sparsity'))} | {r['seconds']:.0f} |")
    tasks = [t["name"] for t in next((r["probe_tasks"] for r in rows if r.get("probe_tasks")), [])]
    if tasks:
        lines += ["", "Probe loss per task (nats; chance ln 2 = 0.693; tokens per class in brackets):", "",
                  "| run | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
        for r in rows:
            by_name = {t["name"]: t for t in r.get("probe_tasks", [])}
            lines.append(f"| {r['name']} | " + " | ".join(f"{by_name[t]['loss']:.3f} ({by_name[t]['per_class']})" if t in by_name
                                                          else "–" for t in tasks) + " |")
    lines += ["", "Power-law fits FVU = c * n^-alpha over n in " + ", ".join(map(str, sorted(NS))) + ":", "",
              "| k | alpha | c | local exponents, n to next n |", "|---|---|---|---|"]
    lines += [f"| {k} | {a:.3f} | {c:.3g} | {' / '.join(f'{e:.2f}' for e in local)} |" for k, (a, c, local) in fits.items()]
    lines += ["", "Plots: " + ", ".join(f"`{p}`" for p in paths.values())]
    (OUT / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
