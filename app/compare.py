"""SAEs of one model and hook side by side (issue 28): every metric in one table, and the trade-off plots.

    /compare?saes=A,B,C           the page (templates/compare.html): the table, the plots as server-side SVG
                                  (app/svg_plots.py; no script, no inline style: the CSP refuses them), and a
                                  chooser of the other SAEs at the same model and hook
    /api/v1/compare?saes=A,B,C    the same data as JSON

What is compared: each SAE's evaluation (saes.metrics, eval.json: `saescope eval`) and its benchmark
results (sae_benchmarks, `saescope bench-sae`; one row per suite seed, shown as the mean with the spread
over seeds). SAEs of different models or hooks read different activations, so comparing their metrics
means nothing: such a request is refused (400) with the reason. `comparison()` is a pure function of
plain dicts, so bench/arch_sweep.py prints the same table the page shows.
"""

from __future__ import annotations

import math

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response
from markupsafe import Markup
from pydantic import BaseModel, Field
from sqlalchemy import Connection, select

from sae_core.evaluation.result import METRICS as BENCH_METRICS
from sae_core.store.schema import SAE, Model, SAEBenchmark

from . import queries, schemas
from .api import DictJSON
from .deps import read_connection
from .render import fmt, templates
from .svg_plots import Axis, Point, Series, scatter_svg

router = APIRouter(include_in_schema=False)
api_router = APIRouter(prefix="/api/v1", tags=["v1"])

MAX_SAES = 24  # per comparison: the architecture sweep's 4 architectures x 3 L0 x 2 seeds fit
# 1 to MAX_SAES comma-separated SAE names, none empty, no control characters (PostgreSQL refuses NUL in text)
NAMES_PATTERN = rf"^[^,\x00-\x1f]+(,[^,\x00-\x1f]+){{0,{MAX_SAES - 1}}}$"

# The evaluation's own fields (eval.json, sae_core/evaluate.py EvalResult): label, better ("higher",
# "lower" or None: neither), meaning. Lists (probe_tasks) and counts that are not metrics stay out.
EVAL_METRICS: dict[str, tuple[str, str | None, str]] = {
    "l0": ("L0", None, "mean active latents per token"),
    "fvu": ("FVU", "lower", "fraction of variance unexplained"),
    "ce_score": ("CE loss recovered", "higher", "(CE zero-ablated - CE with SAE) / (CE zero-ablated - CE clean)"),
    "delta_ce": ("ΔCE (nats)", "lower", "CE with the SAE spliced in minus the clean CE"),
    "kl": ("KL (nats)", "lower", "mean KL(clean || with SAE) of the next-token distributions"),
    "ce_clean": ("CE clean (nats)", None, "the unmodified model's next-token loss"),
    "ce_sae": ("CE with SAE (nats)", "lower", "next-token loss with the reconstruction spliced in"),
    "ce_zero": ("CE zero-ablated (nats)", None, "next-token loss with the hook's output zeroed"),
    "dead_fraction": ("dead latents", "lower", "latents that never fired on the held-out tokens"),
    "rare_fraction": ("rare latents", "lower", "latents firing on fewer than 1e-5 of tokens (dead ones included)"),
    "probe_loss": ("probe loss (nats)", "lower", "best single-latent logistic probe per labelled task, mean (Gao et al. §4)"),
    "ablation_sparsity": ("ablation sparsity", "higher", "mean (L1/L2)^2 / (V T) of one-latent ablations' logit changes"),
    "n2g_precision": ("N2G precision", "higher", "held-out precision of N2G explanations, mean over features"),
    "n2g_recall": ("N2G recall", "higher", "held-out recall of N2G explanations, mean over features"),
    "tokens": ("eval tokens", None, "held-out tokens the evaluation read"),
}
# bench-sae metrics that are sizes, references or ratios whose best value is neither end
NEUTRAL = {
    "l0", "l1", "l2_norm_in", "l2_norm_out", "l2_ratio", "relative_reconstruction_bias", "ce_loss_without_sae",
    "ce_loss_with_ablation", "kl_div_with_ablation", "frequency_mean_log10", "freq_over_1_percent", "llm_probe_accuracy",
    "sae_probe_accuracy", "meta_sae_fvu", "meta_sae_decomposed_fraction", "meta_sae_latents", "meta_sae_k", "n2g_features",
    "absorption_first_letter_probe_f1", "normalized_freq_over_1_percent", "normalized_freq_over_10_percent", "tokens",
    "average_max_encoder_cosine_sim", "absorption_num_split_features",
}  # fmt: skip
# Which end of each other benchmark metric is better, said once per metric (not read from its meaning's wording:
# that put "higher is better" on CE with the SAE and on absorption); tests/test_compare.py checks every metric is
# in exactly one of these or NEUTRAL.
BENCH_HIGHER = {
    "explained_variance", "explained_variance_legacy", "cossim", "ce_loss_recovered", "kl_div_score", "frac_alive",
    "sparse_probing_top1_accuracy", "sparse_probing_top2_accuracy", "sparse_probing_top5_accuracy",
    "sparse_probing_top20_accuracy", "n2g_f1", "llm_detection_score", "absorption_main_latent_f1",
}  # fmt: skip
BENCH_LOWER = {
    "fvu", "mse", "ce_loss_with_sae", "delta_ce", "kl_div_with_sae", "dead_fraction", "freq_over_10_percent",
    "average_max_decoder_cosine_sim", "absorption_fraction", "absorption_full_fraction",
}  # fmt: skip
PERCENT = {"ce_score", "dead_fraction", "rare_fraction", "ablation_sparsity", "ce_loss_recovered", "frac_alive", "explained_variance"}

# Plots: (id, title, x metric, y candidates, x on a log2 axis, y as a percentage). A metric is (source, key,
# axis label); the first y candidate that some SAE has is drawn (for all SAEs, never mixing sources).
_L0 = [("bench", "l0", "L0 (active latents per token)"), ("eval", "l0", "L0 (active latents per token)")]
_WIDTH = [("sae", "n_latents", "width (latents)")]
PLOTS: list[tuple[str, str, list, list, bool]] = [
    ("fvu_vs_l0", "FVU against L0", _L0, [("bench", "fvu", "FVU (lower is better)"), ("eval", "fvu", "FVU (lower is better)")], True),
    (
        "ce_vs_l0",
        "CE loss recovered against L0",
        _L0,
        [("bench", "ce_loss_recovered", "CE loss recovered"), ("eval", "ce_score", "CE loss recovered")],
        True,
    ),
    ("absorption_vs_width", "Absorption against width", _WIDTH, [("bench", "absorption_fraction", "absorption (lower is better)")], True),
    (
        "probing_vs_width",
        "Sparse probing against width",
        _WIDTH,
        [
            ("bench", "sparse_probing_top1_accuracy", "probe accuracy, 1 latent"),
            ("eval", "probe_loss", "best 1-latent probe loss (nats)"),
        ],
        True,
    ),
]
ARCH_ORDER = ("topk", "batchtopk", "jumprelu", "matryoshka_batchtopk", "relu")


class CompareRefused(ValueError):
    """A comparison that cannot be made (mixed models or hooks, too many SAEs): the reason is the message."""


# --- reading ---------------------------------------------------------------------------------------


def parse_names(values: list[str]) -> list[str]:
    """SAE names from comma-separated values (?saes=A,B or a form's ?saes=A&saes=B), first occurrence kept."""
    names: list[str] = []
    for value in values:
        for raw in value.split(","):
            name = raw.strip() or raw  # a blank name stays, to be reported unknown
            if any(ord(ch) < 32 for ch in name):
                raise CompareRefused(f"{name!r} is no SAE name: names have no control characters")
            if name and name not in names:
                names.append(name)
    if not names:
        raise CompareRefused("name at least one SAE: /compare?saes=A,B,C")
    if len(names) > MAX_SAES:
        raise CompareRefused(f"{len(names)} SAEs asked for; a comparison takes at most {MAX_SAES}")
    return names


def _numbers(d: dict) -> dict[str, float]:
    return {k: float(v) for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def _train_seed(train_config: dict) -> int | None:
    seed = (train_config or {}).get("training", {}).get("seed") if isinstance((train_config or {}).get("training"), dict) else None
    return seed if isinstance(seed, int) else None


def load(conn: Connection, names: list[str]) -> dict:
    """{"model", "hook", "saes": [entry]} for the named SAEs, in the order asked; NotFound names the unknown
    ones, CompareRefused the mix of models or hooks. An entry: name, architecture, n_latents, k, d_in,
    train_seed, eval (numbers of eval.json), bench_runs ([{seed, metrics, absorption_valid}])."""
    rows = conn.execute(
        select(SAE.id, SAE.name, SAE.hook, SAE.architecture, SAE.n_latents, SAE.k, SAE.d_in, SAE.metrics, SAE.train_config, Model.name)
        .join(Model, SAE.model_id == Model.id)
        .where(SAE.name.in_(names))
    ).all()
    found = {r[1]: (r, r[-1]) for r in rows}
    missing = [n for n in names if n not in found]
    if missing:
        raise queries.NotFound(f"no SAE named {', '.join(repr(n) for n in missing)}")
    places = {(found[n][1], found[n][0].hook) for n in names}
    if len(places) > 1:
        where = "; ".join(f"{n} reads {found[n][1]} at {found[n][0].hook}" for n in names)
        raise CompareRefused(
            f"these SAEs read different activations ({where}): their metrics are not comparable; compare SAEs of one model and hook"
        )
    ids = {found[n][0].id: n for n in names}
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for sae_id, seed, results in conn.execute(
        select(SAEBenchmark.sae_id, SAEBenchmark.seed, SAEBenchmark.results)
        .where(SAEBenchmark.sae_id.in_(list(ids)))
        .order_by(SAEBenchmark.sae_id, SAEBenchmark.seed)
    ):
        results = results or {}
        valid = results.get("absorption_valid")
        valid = valid if isinstance(valid, bool) else None
        runs[ids[sae_id]].append({"seed": seed, "metrics": _numbers(results), "absorption_valid": valid})
    model, hook = next(iter(places))
    entries = []
    for n in names:
        sae = found[n][0]
        entries.append(
            {
                "name": n,
                "architecture": sae.architecture,
                "n_latents": sae.n_latents,
                "k": sae.k,
                "d_in": sae.d_in,
                "train_seed": _train_seed(sae.train_config),
                "eval": {k: v for k, v in _numbers(sae.metrics or {}).items() if k in EVAL_METRICS},
                "bench_runs": runs[n],
            }
        )
    return {"model": model, "hook": hook, "saes": entries}


def siblings(conn: Connection, model: str | None = None, hook: str | None = None) -> list[dict]:
    """The SAEs the chooser offers, grouped by model and hook: [{"model", "hook", "saes": [{name, architecture,
    n_latents, k}]}]; only the one group when model and hook are given."""
    q = select(Model.name, SAE.hook, SAE.name, SAE.architecture, SAE.n_latents, SAE.k).join(Model, SAE.model_id == Model.id)
    if model is not None:
        q = q.where(Model.name == model, SAE.hook == hook)
    groups: dict[tuple[str, str], list[dict]] = {}
    for m, h, name, arch, n, k in conn.execute(q.order_by(Model.name, SAE.hook, SAE.name)):
        groups.setdefault((m, h), []).append({"name": name, "architecture": arch, "n_latents": n, "k": k})
    return [{"model": m, "hook": h, "saes": saes} for (m, h), saes in groups.items()]


# --- the comparison (pure) -------------------------------------------------------------------------


def _summary(values: list[float]) -> dict:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return {"mean": mean, "min": min(values), "max": max(values), "std": std, "n": n}


def _bench_better(key: str) -> str | None:
    return "higher" if key in BENCH_HIGHER else "lower" if key in BENCH_LOWER else None


def _value(entry: dict, metric: tuple[str, str, str]) -> dict | None:
    source, key, _ = metric
    if source == "sae":
        v = entry.get(key)
        return None if v is None else {"mean": float(v), "min": float(v), "max": float(v), "std": None, "n": 1}
    if source == "eval":
        v = entry["eval"].get(key)
        return None if v is None else {"mean": v, "min": v, "max": v, "std": None, "n": 1}
    return entry["bench"].get(key)


def comparison(data: dict) -> dict:
    """From load()'s {"model", "hook", "saes"}: each SAE's bench metrics summarised over seeds, the table
    rows (every metric any SAE has, eval first, then bench-sae in the suite's order) and the plot data."""
    saes = data["saes"]
    for e in saes:
        per_key: dict[str, list[float]] = {}
        for run in e["bench_runs"]:
            for k, v in run["metrics"].items():
                per_key.setdefault(k, []).append(v)
        e["bench"] = {k: _summary(vs) for k, vs in per_key.items()}
        e["bench_seeds"] = [r["seed"] for r in e["bench_runs"]]
        valid = [r["absorption_valid"] for r in e["bench_runs"] if r["absorption_valid"] is not None]
        e["absorption_valid"] = all(valid) if valid else None
    rows = []
    eval_keys = [k for k in EVAL_METRICS if any(k in e["eval"] for e in saes)]
    bench_known = list(BENCH_METRICS)
    bench_keys = sorted({k for e in saes for k in e["bench"]}, key=lambda k: (bench_known.index(k) if k in bench_known else 999, k))
    for source, keys in (("eval", eval_keys), ("bench", bench_keys)):
        for key in keys:
            if source == "eval":
                label, better, meaning = EVAL_METRICS[key]
            else:
                label, better, meaning = key, _bench_better(key), BENCH_METRICS.get(key, ("", ""))[1]
            cells = [_value(e, (source, key, "")) for e in saes]
            best: list[int] = []
            present = [(i, c["mean"]) for i, c in enumerate(cells) if c is not None]
            if better and len(present) > 1:
                target = (min if better == "lower" else max)(v for _, v in present)
                best = [i for i, v in present if v == target]
            rows.append(
                {"source": source, "key": key, "label": label, "better": better, "meaning": meaning, "percent": key in PERCENT,
                 "values": cells, "best": best}
            )  # fmt: skip
    plots = []
    for plot_id, title, x_metrics, y_metrics, x_log in PLOTS:
        y_metric = next((m for m in y_metrics if any(_value(e, m) is not None for e in saes)), y_metrics[0])
        x_metric = next((m for m in x_metrics if m[0] == y_metric[0] or m[0] == "sae"), x_metrics[0])
        if not any(_value(e, x_metric) for e in saes):
            x_metric = next((m for m in x_metrics if any(_value(e, m) is not None for e in saes)), x_metric)
        series: dict[str, list[dict]] = {}
        left_out = []
        for e in saes:
            x, y = _value(e, x_metric), _value(e, y_metric)
            if x is None or y is None:
                left_out.append(e["name"])
                continue
            series.setdefault(e["architecture"], []).append(
                {"sae": e["name"], "x": x["mean"], "y": y["mean"], "y_min": y["min"], "y_max": y["max"], "n": y["n"]}
            )
        plots.append(
            {
                "id": plot_id,
                "title": title,
                "x": {"source": x_metric[0], "key": x_metric[1], "label": x_metric[2], "log2": x_log},
                "y": {"source": y_metric[0], "key": y_metric[1], "label": y_metric[2], "percent": y_metric[1] in PERCENT},
                "series": [{"architecture": a, "points": series[a]} for a in sorted(series, key=_arch_rank)],
                "left_out": left_out,
            }
        )
    notes = []
    for e in saes:
        if e["absorption_valid"] is False:
            f1 = e["bench"].get("absorption_first_letter_probe_f1")
            notes.append(
                f"{e['name']}: absorption not measured: the model's first-letter probes at this hook are too weak for it to mean anything"
                + (f" (F1 {f1['mean']:.2f})" if f1 else "")
            )
        if not e["eval"] and not e["bench"]:
            notes.append(f"{e['name']}: neither evaluated nor benchmarked yet (saescope eval, saescope bench-sae)")
    return {"model": data["model"], "hook": data["hook"], "saes": saes, "metrics": rows, "plots": plots, "notes": notes}


def _arch_rank(arch: str) -> tuple[int, str]:
    return (ARCH_ORDER.index(arch) if arch in ARCH_ORDER else len(ARCH_ORDER), arch)


def cell_text(cell: dict | None, percent: bool = False) -> str:
    """A table cell: the mean, and with several seeds the spread as ± half the min-max range."""
    if cell is None:
        return "–"

    def show(v: float) -> str:
        return f"{100 * v:.2f}%" if percent else fmt(v, 4)

    text = show(cell["mean"])
    if cell["n"] > 1:
        half = (cell["max"] - cell["min"]) / 2
        text += f" ± {100 * half:.2f}" if percent else f" ± {fmt(half, 4)}"
    return text


def _short(label: str) -> str:
    return label.split(" (")[0]


def plot_svgs(comp: dict, href: bool = True) -> list[Markup]:
    """The comparison's plots as SVG, one series (colour and marker) per architecture."""
    styles = {a: i for i, a in enumerate(sorted({e["architecture"] for e in comp["saes"]}, key=_arch_rank))}
    out = []
    for p in comp["plots"]:
        series = [
            Series(
                s["architecture"],
                [
                    Point(
                        q["x"],
                        q["y"],
                        f"{q['sae']}: {_short(p['x']['label'])} {fmt(q['x'], 4)}, {_short(p['y']['label'])} {fmt(q['y'], 4)}"
                        + (f" (mean of {q['n']} seeds, {fmt(q['y_min'], 4)} to {fmt(q['y_max'], 4)})" if q["n"] > 1 else ""),
                        f"/saes/{q['sae']}" if href else None,
                        q["y_min"],
                        q["y_max"],
                    )
                    for q in s["points"]
                ],
                styles[s["architecture"]],
            )
            for s in p["series"]
        ]
        x_axis, y_axis = Axis(p["x"]["label"], log2=p["x"]["log2"]), Axis(p["y"]["label"], percent=p["y"]["percent"])
        out.append(scatter_svg(p["title"], x_axis, y_axis, series))
    return out


def markdown_table(comp: dict) -> str:
    """The table as Markdown (bench/arch_sweep.py, bench/RESULTS.md): one row per SAE, one column per metric."""
    rows = comp["metrics"]
    head = ["SAE", "architecture", "width"] + [f"{r['label']}{'' if r['source'] == 'eval' else ' (bench)'}" for r in rows]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, e in enumerate(comp["saes"]):
        cells = [e["name"], e["architecture"], f"{e['n_latents']:,}"] + [cell_text(r["values"][i], r["percent"]) for r in rows]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --- routes ----------------------------------------------------------------------------------------


def _page_context(conn: Connection, names: list[str]) -> dict:
    if not names:
        return {"comp": None, "groups": siblings(conn), "chosen": []}
    comp = comparison(load(conn, names))
    return {
        "comp": comp,
        "svgs": plot_svgs(comp),
        "groups": siblings(conn, comp["model"], comp["hook"]),
        "chosen": names,
        "cell_text": cell_text,
    }


@router.get("/compare")
async def compare_page(request: Request, saes: list[str] = Query([], max_length=MAX_SAES * 201)) -> Response:
    """With no SAEs named: the chooser of every model and hook; with names: the comparison."""
    try:
        names = parse_names(saes) if saes else []

        def render(conn: Connection) -> Response:
            return templates.TemplateResponse(request, "compare.html", _page_context(conn, names))

        return await read_connection(request, render)
    except CompareRefused as exc:
        ctx = {"status": 400, "title": "Cannot compare these SAEs", "reason": str(exc)}
        return templates.TemplateResponse(request, "error.html", ctx, status_code=400)


class MetricCell(BaseModel):
    mean: float
    min: float
    max: float
    std: float | None = Field(description="sample standard deviation over the benchmark's seeds; null for one value")
    n: int = Field(description="values the mean is over: bench-sae seeds (1 for an eval.json metric)")


class BenchRun(BaseModel):
    seed: int
    metrics: dict[str, float]
    absorption_valid: bool | None


class ComparedSAE(BaseModel):
    name: str
    architecture: str
    n_latents: int
    k: int | None
    d_in: int
    train_seed: int | None = Field(description="the training run's seed, where the SAE was trained by saescope")
    eval: dict[str, float] = Field(description="numbers of its eval.json (saescope eval)")
    bench_runs: list[BenchRun] = Field(description="its saescope bench-sae results, one per suite seed")
    bench: dict[str, MetricCell] = Field(description="those summarised over seeds, per metric")
    bench_seeds: list[int]
    absorption_valid: bool | None = Field(description="false: the first-letter probes were too weak for absorption to mean anything")


class MetricRow(BaseModel):
    source: str = Field(description='"eval" (eval.json) or "bench" (sae_benchmarks)')
    key: str
    label: str
    better: str | None = Field(description='"higher", "lower", or null where neither end is better')
    meaning: str
    percent: bool
    values: list[MetricCell | None] = Field(description="one per SAE, in the order of `saes`")
    best: list[int] = Field(description="indices of the SAEs with the best value (ties all), where `better` says which")


class PlotAxis(BaseModel):
    source: str
    key: str
    label: str
    log2: bool | None = None
    percent: bool | None = None


class PlotPoint(BaseModel):
    sae: str
    x: float
    y: float
    y_min: float
    y_max: float
    n: int


class PlotSeries(BaseModel):
    architecture: str
    points: list[PlotPoint]


class Plot(BaseModel):
    id: str
    title: str
    x: PlotAxis
    y: PlotAxis
    series: list[PlotSeries]
    left_out: list[str] = Field(description="SAEs without this pair of metrics")


class Comparison(BaseModel):
    model: str
    hook: str
    saes: list[ComparedSAE]
    metrics: list[MetricRow]
    plots: list[Plot]
    notes: list[str]


@api_router.get(
    "/compare",
    response_model=Comparison,
    summary="SAEs of one model and hook side by side: every metric, and the data of the trade-off plots",
    responses={
        400: {"model": schemas.Problem, "description": "The SAEs read different models or hooks, or too many were named"},
        404: {"model": schemas.Problem, "description": "No SAE of one of these names"},
    },
)
async def compare_api(
    request: Request,
    saes: str = Query(
        ..., description="comma-separated SAE names, e.g. A,B,C", min_length=1, max_length=MAX_SAES * 201, pattern=NAMES_PATTERN
    ),
) -> Response:
    try:
        names = parse_names([saes])
        return DictJSON(await read_connection(request, lambda conn: comparison(load(conn, names))))
    except CompareRefused as exc:
        return JSONResponse({"detail": str(exc)}, status_code=400)
