"""/compare and /api/v1/compare (app/compare.py): SAEs of one model and hook side by side, from their
eval.json and their bench-sae rows; mixing models or hooks is refused with the reason; the plots are
SVG drawn by app/svg_plots.py with no inline script or style."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from app.compare import MAX_SAES, cell_text, comparison, markdown_table
from app.main import create_app
from app.svg_plots import Axis, Point, Series, scatter_svg
from sae_core.store import db
from sae_core.store.schema import SAE, Model, SAEBenchmark

HOOK = "blocks.1.hook_resid_post"


def _eval(l0: float, fvu: float, ce: float) -> dict:
    task = {"name": "x", "loss": 0.5, "latent": 3, "per_class": 10}
    return {"tokens": 4096, "l0": l0, "fvu": fvu, "ce_score": ce, "delta_ce": 0.3, "kl": 0.1, "dead_fraction": 0.0,
            "rare_fraction": 0.01, "probe_loss": 0.5, "probe_tasks": [task], "ablation_sparsity": None, "ablations": 0}  # fmt: skip


# name -> (model, hook, architecture, width, k, eval.json, {bench seed: results})
SAES = {
    "topk-16": ("m1", HOOK, "topk", 8192, 16, _eval(16, 0.30, 0.90), {
        0: {"l0": 16.0, "fvu": 0.31, "ce_loss_recovered": 0.90, "sparse_probing_top1_accuracy": 0.70, "absorption_fraction": 0.20,
            "absorption_valid": True, "details": {"probing": {"tasks": 3}}},
        1: {"l0": 16.0, "fvu": 0.29, "ce_loss_recovered": 0.92, "sparse_probing_top1_accuracy": 0.74, "absorption_fraction": 0.22,
            "absorption_valid": True}}),
    "topk-32": ("m1", HOOK, "topk", 8192, 32, _eval(32, 0.22, 0.94), {
        0: {"l0": 32.0, "fvu": 0.22, "ce_loss_recovered": 0.94, "sparse_probing_top1_accuracy": 0.76, "absorption_fraction": 0.25,
            "absorption_valid": True}}),
    "batchtopk-16": ("m1", HOOK, "batchtopk", 8192, 16, _eval(16.2, 0.28, 0.91), {
        0: {"l0": 16.2, "fvu": 0.28, "ce_loss_recovered": 0.91, "sparse_probing_top1_accuracy": 0.71, "absorption_fraction": 0.18,
            "absorption_valid": True}}),
    "jumprelu-2k": ("m1", HOOK, "jumprelu", 2048, None, _eval(20.5, 0.35, 0.88), {}),
    "other-hook": ("m1", "blocks.2.hook_resid_post", "topk", 8192, 16, _eval(16, 0.3, 0.9), {}),
    "other-model": ("m2", HOOK, "topk", 8192, 16, _eval(16, 0.3, 0.9), {}),
    "weak-letters": ("m3", HOOK, "matryoshka_batchtopk", 4096, 32, {}, {
        0: {"l0": 32.0, "fvu": 0.2, "absorption_first_letter_probe_f1": 0.41, "absorption_valid": False}}),
}  # fmt: skip


def fill(url: str) -> None:
    engine = db.open_store(url, upgrade_schema=True)
    with Session(engine) as s, s.begin():
        models = {}
        for name in ("m1", "m2", "m3"):
            models[name] = Model(name=name, d_model=64, n_layers=4, vocab_size=100)
            s.add(models[name])
        s.flush()
        for name, (model, hook, arch, width, k, metrics, bench) in SAES.items():
            sae = SAE(name=name, model_id=models[model].id, hook=hook, architecture=arch, d_in=64, n_latents=width, k=k,
                      path=f"/runs/{name}", train_config={"training": {"seed": 7}}, metrics=metrics)  # fmt: skip
            s.add(sae)
            s.flush()
            for seed, results in bench.items():
                s.add(SAEBenchmark(sae_id=sae.id, suite_version="1", seed=seed, results=results, saebench=[], config={}))
    engine.dispose()


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    url = f"sqlite:///{tmp_path_factory.mktemp('compare') / 'store.db'}"
    fill(url)
    with TestClient(create_app(url)) as c:
        yield c


def test_api_puts_the_saes_side_by_side_with_seed_spreads(client):
    r = client.get("/api/v1/compare", params={"saes": "topk-16,batchtopk-16,topk-32,jumprelu-2k"})
    assert r.status_code == 200, r.text
    d = r.json()
    assert (d["model"], d["hook"]) == ("m1", HOOK)
    assert [e["name"] for e in d["saes"]] == ["topk-16", "batchtopk-16", "topk-32", "jumprelu-2k"]  # the order asked
    topk = d["saes"][0]
    assert topk["train_seed"] == 7 and topk["bench_seeds"] == [0, 1]
    assert "probe_tasks" not in topk["eval"] and topk["eval"]["fvu"] == 0.30
    fvu = topk["bench"]["fvu"]
    assert fvu["n"] == 2 and fvu["min"] == 0.29 and fvu["max"] == 0.31
    assert fvu["mean"] == pytest.approx(0.30) and fvu["std"] == pytest.approx(0.01414, abs=1e-4)
    rows = {(m["source"], m["key"]): m for m in d["metrics"]}
    assert rows[("eval", "fvu")]["better"] == "lower" and rows[("eval", "fvu")]["best"] == [2]  # topk-32's 0.22
    assert rows[("bench", "sparse_probing_top1_accuracy")]["best"] == [2]  # topk-32: 0.76
    assert rows[("eval", "l0")]["better"] is None and rows[("eval", "l0")]["best"] == []
    assert rows[("bench", "fvu")]["values"][3] is None  # jumprelu-2k was never benchmarked
    assert [m["source"] for m in d["metrics"]] == sorted((m["source"] for m in d["metrics"]), key=["eval", "bench"].index)


def test_api_plots_use_one_source_per_plot_and_group_by_architecture(client):
    d = client.get("/api/v1/compare", params={"saes": "topk-16,batchtopk-16,topk-32,jumprelu-2k"}).json()
    plots = {p["id"]: p for p in d["plots"]}
    fvu = plots["fvu_vs_l0"]
    assert (fvu["x"]["source"], fvu["y"]["source"]) == ("bench", "bench")  # bench results exist, so bench for every point
    assert fvu["left_out"] == ["jumprelu-2k"]
    assert [s["architecture"] for s in fvu["series"]] == ["topk", "batchtopk"]
    topk = {p["sae"]: p for p in fvu["series"][0]["points"]}
    assert topk["topk-16"]["x"] == 16.0 and topk["topk-16"]["y"] == pytest.approx(0.30)
    assert (topk["topk-16"]["y_min"], topk["topk-16"]["y_max"], topk["topk-16"]["n"]) == (0.29, 0.31, 2)
    width = plots["probing_vs_width"]
    assert width["x"]["key"] == "n_latents" and width["y"]["key"] == "sparse_probing_top1_accuracy"
    # only eval.json: the evaluation's own FVU and L0 are drawn
    only_eval = {p["id"]: p for p in client.get("/api/v1/compare", params={"saes": "jumprelu-2k"}).json()["plots"]}
    assert only_eval["fvu_vs_l0"]["y"]["source"] == "eval" and only_eval["fvu_vs_l0"]["series"][0]["points"][0]["x"] == 20.5
    assert only_eval["probing_vs_width"]["y"]["key"] == "probe_loss"
    assert only_eval["absorption_vs_width"]["series"] == [] and only_eval["absorption_vs_width"]["left_out"] == ["jumprelu-2k"]


@pytest.mark.parametrize("names, word", [("topk-16,other-hook", "blocks.2.hook_resid_post"), ("topk-16,other-model", "m2")])
def test_mixing_models_or_hooks_is_refused_with_the_reason(client, names, word):
    r = client.get("/api/v1/compare", params={"saes": names})
    assert r.status_code == 400
    assert word in r.json()["detail"] and "not comparable" in r.json()["detail"]
    page = client.get("/compare", params={"saes": names})
    assert page.status_code == 400 and word in page.text and "not comparable" in page.text


def test_bad_input_is_a_4xx_with_the_reason(client):
    r = client.get("/api/v1/compare", params={"saes": "topk-16,nope,also-nope"})
    assert r.status_code == 404 and "'nope'" in r.json()["detail"] and "'also-nope'" in r.json()["detail"]
    for bad in ("", "a,,b", ",a", "topk-16,\n", ",".join(f"s{i}" for i in range(MAX_SAES + 1))):
        r = client.get("/api/v1/compare", params={"saes": bad})
        assert r.status_code == 422, bad
        assert r.json()["detail"][0]["loc"] == ["query", "saes"]
    # a NUL anywhere in a query is refused before routing (app.http.RefuseNul), with the reason
    r = client.get("/api/v1/compare", params={"saes": "a\x00b"})
    assert r.status_code == 400 and "NUL" in r.json()["detail"]
    assert client.get("/api/v1/compare").status_code == 422
    assert client.get("/api/v1/compare", params={"saes": " "}).status_code == 404  # a blank name is no SAE's
    assert client.get("/compare", params={"saes": "nope"}).status_code == 404
    assert client.get("/compare", params={"saes": "a\x00b"}).status_code == 400
    r = client.get("/compare", params={"saes": [f"s{i}" for i in range(MAX_SAES + 1)]})
    assert r.status_code == 400 and f"at most {MAX_SAES}" in r.text
    # the same SAE twice is one column
    assert [e["name"] for e in client.get("/api/v1/compare", params={"saes": "topk-16, topk-16"}).json()["saes"]] == ["topk-16"]


def test_weak_first_letter_probes_are_said_not_hidden(client):
    d = client.get("/api/v1/compare", params={"saes": "weak-letters"}).json()
    assert d["saes"][0]["absorption_valid"] is False
    assert any("absorption not measured" in n and "F1 0.41" in n for n in d["notes"])
    page = client.get("/compare", params={"saes": "weak-letters"}).text
    assert "absorption not measured" in page


def test_page_draws_svg_plots_and_the_table_under_the_csp(client):
    r = client.get("/compare", params={"saes": ["topk-16,batchtopk-16", "topk-32"]})  # a form's repeated names work too
    assert r.status_code == 200
    assert "script-src 'self'" in r.headers["content-security-policy"] and "style-src 'self'" in r.headers["content-security-policy"]
    html = r.text
    main = html[html.index("<main>") :]
    assert "<script" not in main and "style=" not in main and " on" + "click=" not in main  # nothing the CSP refuses
    assert main.count('<svg class="plot"') == 4
    for text in ("FVU against L0", "CE loss recovered against L0", "Absorption against width", "Sparse probing against width",
                 "L0 (active latents per token)", "width (latents)"):  # fmt: skip
        assert text in main
    fvu_plot = main[main.index('id="plot-fvu_vs_l0"') : main.index('id="plot-ce_vs_l0"')]
    assert ">topk</text>" in fvu_plot and ">batchtopk</text>" in fvu_plot  # the legend, by architecture
    assert fvu_plot.count('<a class="point" href="/saes/') == 3
    assert "topk-16: L0" in fvu_plot and "(mean of 2 seeds, 0.29 to 0.31)" in fvu_plot  # the tooltip
    assert "0.3 ± 0.01" in main  # bench FVU of topk-16: mean ± half the range over its 2 seeds
    assert re.search(r'<td class="num best">0\.22</td>', main)  # the lowest eval FVU is marked
    assert 'href="/api/v1/compare?saes=topk-16%2Cbatchtopk-16%2Ctopk-32"' in main
    assert main.count('type="checkbox" name="saes"') == 4  # the chooser offers the SAEs of this model and hook only
    assert 'value="other-hook"' not in main


def test_chooser_without_names_and_links_from_home_and_sae_pages(client):
    page = client.get("/compare").text
    for name in SAES:
        assert f'value="{name}"' in page
    assert page.count('<form class="card compare-chooser"') == 4  # m1 at two hooks, m2, m3
    home = client.get("/").text
    assert 'href="/compare?saes=batchtopk-16,jumprelu-2k,topk-16,topk-32"' in home
    assert 'href="/compare?saes=topk-16"' in client.get("/saes/topk-16").text


def test_markdown_table_and_cells():
    runs = [
        {"seed": 0, "metrics": {"fvu": 0.21}, "absorption_valid": None},
        {"seed": 1, "metrics": {"fvu": 0.23}, "absorption_valid": None},
    ]
    data = {"model": "m", "hook": "h", "saes": [
        {"name": "a", "architecture": "topk", "n_latents": 8192, "k": 16, "d_in": 4, "train_seed": 0, "eval": {"fvu": 0.2, "ce_score": 0.9},
         "bench_runs": runs},
    ]}  # fmt: skip
    comp = comparison(data)
    table = markdown_table(comp)
    assert table.splitlines()[0] == "| SAE | architecture | width | FVU | CE loss recovered | fvu (bench) |"
    assert table.splitlines()[2] == "| a | topk | 8,192 | 0.2 | 90.00% | 0.22 ± 0.01 |"
    assert cell_text(None) == "–"


def test_svg_escapes_names_and_says_when_empty():
    svg = scatter_svg("t<1>", Axis("x"), Axis("y"), [Series("<script>alert(1)</script>", [Point(1, 2, 'a"b', "/saes/a?b=<c>")])])
    assert "<script>" not in svg and "&lt;script&gt;" in svg and "t&lt;1&gt;" in svg and 'href="/saes/a?b=&lt;c&gt;"' in svg
    empty = scatter_svg("t", Axis("L0", log2=True), Axis("y"), [Series("a", [Point(0, 1, "zero L0 is off a log axis")])])
    assert "no SAE here has this pair of metrics" in empty and "<circle" not in empty
    ticks = scatter_svg("t", Axis("L0", log2=True), Axis("y"), [Series("a", [Point(16, 1, "p"), Point(64, 2, "q")])])
    assert all(f">{t}</text>" in ticks for t in ("16", "32", "64"))


def test_api_on_postgresql(pg_url):
    fill(pg_url)
    with TestClient(create_app(pg_url)) as c:
        assert c.get("/api/v1/compare", params={"saes": "topk-16,a\x00b"}).status_code == 400  # not a 500 from the driver
        d = c.get("/api/v1/compare", params={"saes": "topk-16,topk-32"}).json()
        assert d["saes"][0]["bench"]["fvu"]["n"] == 2 and d["saes"][1]["eval"]["fvu"] == 0.22
        assert c.get("/api/v1/compare", params={"saes": "topk-16,other-model"}).status_code == 400


def test_every_benchmark_metric_says_which_end_is_better_once():
    """Each benchmark metric is in exactly one of higher-is-better, lower-is-better or neutral, so a new metric
    cannot be marked by guesswork (the wording of its meaning once put 'higher is better' on absorption)."""
    from app.compare import BENCH_HIGHER, BENCH_LOWER, NEUTRAL, _bench_better
    from sae_core.evaluation.result import METRICS

    for key in METRICS:
        assert (key in BENCH_HIGHER) + (key in BENCH_LOWER) + (key in NEUTRAL) == 1, key
    assert {k: _bench_better(k) for k in ("absorption_fraction", "ce_loss_with_sae", "n2g_f1", "tokens")} == {
        "absorption_fraction": "lower", "ce_loss_with_sae": "lower", "n2g_f1": "higher", "tokens": None,
    }  # fmt: skip
