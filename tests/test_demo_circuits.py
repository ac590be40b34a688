"""`saescope demo --circuits` (issue 29 item 6) on the tiny Llama: transcoders for every layer, their evaluation, the
prompt's graph stored under its permalink, the graph's feature layers mined and explained under the demo's names so
the nodes link to feature pages; a second run skips every step and returns the same graph."""

from __future__ import annotations

import json

from rich.console import Console

from sae_core.config import DemoConfig
from sae_core.train_transcoders import SUMMARY
from saescope.demo_circuits import EVAL_FILE, layer_name, run_circuits

PROMPT = "The cat sat on the mat and the dog"


def test_demo_circuits_builds_links_and_resumes(tiny_model, tiny_corpus, tmp_path):
    from fastapi.testclient import TestClient

    from app.main import create_app

    url = f"sqlite:///{tmp_path / 'store.db'}"
    cfg = DemoConfig(
        circuits=True, circuits_tokens=2048, eval_tokens=512, circuits_mine_tokens=1024, circuits_prompt=PROMPT, db=url, device="cpu"
    )
    console = Console(file=open(tmp_path / "log.txt", "w"), width=200)  # noqa: SIM115 (closed with the test's tmp_path)
    # the tiny random model's direct token -> logit paths carry most influence: keep 95 % of it so features survive
    kwargs = dict(model=str(tiny_model), corpus=str(tiny_corpus), node_threshold=0.95)
    first = run_circuits(cfg, console, tmp_path / "run", **kwargs)

    folder = first.transcoders
    assert (folder / SUMMARY).exists() and len(json.loads((folder / SUMMARY).read_text())["layers"]) == 4
    report = json.loads((folder / EVAL_FILE).read_text())
    assert set(report["fvu"]) == {"0", "1", "2", "3"} and report["ce_replaced"] > 0
    assert first.graph_url.startswith("/graphs/") and first.mined
    assert all(name == layer_name(layer, str(tiny_model)) for layer, name in first.mined.items())

    with TestClient(create_app(url)) as client:
        graph = client.get(f"/api/v1{first.graph_url}").json()
        features = [n for n in graph["nodes"] if n["kind"] == "feature"]
        assert {n["layer"] for n in features} == set(first.mined)  # every layer with a node was mined
        for node in features:  # each feature node opens its page
            assert node["sae"] == first.mined[node["layer"]] and node["url"]
            assert client.get(node["url"]).status_code == 200
        assert client.get(first.graph_url).status_code == 200

    log = (tmp_path / "log.txt").read_text()
    assert "[circuits 4/4]" in log and "graph: /graphs/" in log

    again = run_circuits(cfg, console, tmp_path / "run", **kwargs)
    assert again.graph_url == first.graph_url and again.mined == first.mined
    console.file.flush()
    rerun = (tmp_path / "log.txt").read_text()[len(log) :]
    assert "transcoders trained: skipped" in rerun and f"{EVAL_FILE} present: skipped" in rerun and "stored graph: skipped" in rerun
    assert "already mined" in rerun


def test_demo_refuses_a_bad_circuits_prompt_before_any_work(tmp_path):
    import pytest

    from sae_core.errors import SaescopeError
    from saescope.demo import run_demo

    url = f"sqlite:///{tmp_path / 'store.db'}"
    for prompt, reason in (("   ", "empty"), ("word " * 65, "more than 64 words")):
        with pytest.raises(SaescopeError, match=reason):
            run_demo(DemoConfig(circuits=True, circuits_prompt=prompt, db=url), Console(file=open(tmp_path / "x.txt", "w")))  # noqa: SIM115
    assert not (tmp_path / "home" / "runs" / "demo").exists()  # nothing fetched, cached or trained
