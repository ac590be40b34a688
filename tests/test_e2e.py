"""End to end on the real bundled model: every `saescope demo` stage with a small budget, then the
pages and the API answer with real contexts of the real corpus (~2 min on 2 CPU cores)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from sae_core import corpus as corpus_mod
from test_cli import free_port, serve_then_interrupt

pytestmark = pytest.mark.real_model

BUDGET = ["--cache-tokens", "50000", "--n-latents", "1024", "--k", "32", "--train-tokens", "100000",
          "--eval-tokens", "2048", "--mine-tokens", "20000", "--name", "e2e", "--no-serve"]


def test_demo_stages_then_pages_and_api(tmp_path):
    env = {**os.environ, "SAESCOPE_HOME": os.environ["SAESCOPE_HOME"]}
    cmd = [sys.executable, "-c", "from saescope.cli import main; main()", "demo", *BUDGET]
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    assert first.returncode == 0, first.stderr[-3000:]
    for stage in ("[1/6]", "[2/6]", "[3/6]", "[4/6]", "[5/6]", "[6/6]", "atlas ready"):
        assert stage in first.stderr
    # Again, as `make demo` runs it: every stage skips its finished work, then the atlas is served
    # (the step that once crashed behind a green suite) and Ctrl-C stops it cleanly.
    port = free_port()
    serving = [a for a in BUDGET if a != "--no-serve"] + ["--port", str(port)]
    again = serve_then_interrupt(["demo", *serving], port, "/saes/e2e/features/0", timeout=600)
    assert again.count("skipped") == 3 and "already holds run" in again and "serving" in again

    corpus = corpus_mod.open_corpus("demo")
    with TestClient(create_app()) as client:
        sae = client.get("/api/v1/saes/e2e").json()
        assert sae["n_latents"] == 1024 and sae["metrics"]["ce_score"] > 0.3 and sae["alive"] > 900
        assert client.get("/").status_code == 200 and "e2e" in client.get("/").text
        strongest = client.get("/api/v1/saes/e2e/features?sort=max_act&order=desc&limit=5").json()["features"]
        checked = 0
        for feat in strongest:
            page = client.get(f"/saes/e2e/features/{feat['index']}")
            assert page.status_code == 200 and '<svg class="hist"' in page.text
            for ex in client.get(f"/api/v1/saes/e2e/features/{feat['index']}/examples?limit=5").json()["examples"]:
                assert ex["doc_id"].split("/")[0] in {"sotu", "moby-dick", "spam-ham", "brown"}
                if ex["doc_offset"] < 0:
                    continue
                peak = ex["tokens"][ex["max_pos"]]
                if "\ufffd" in peak:      # part of a multi-byte character: not text on its own
                    continue
                text = corpus.read(corpus.doc_ids.index(ex["doc_id"]))
                assert peak.strip() in text    # the peak token is real text of the named document
                checked += 1
        assert checked > 0
        assert sae["metrics"]["n2g_features"] == sae["alive"]  # the demo explained every fired feature
        explained = client.get("/api/v1/saes/e2e/features?sort=explanation&order=desc&limit=3").json()["features"]
        assert all(f["explanation"] and f["explanation_score"] is not None for f in explained)
        assert client.get("/api/v1/search", params={"q": "whaling"}).json()["features"]  # by meaning
        hits = client.get("/api/v1/search", params={"q": "the"}).json()["hits"]
        assert hits and all("the" in h["token"].lower() for h in hits)

    # `demo --circuits` on the same home (issue 29 item 6): the atlas's stages skip, then transcoders for all 30 layers
    # on a few thousand tokens, their evaluation, the two-step prompt's graph and its layers mined; the link answers
    circuits = subprocess.run(
        [*cmd, "--circuits", "--circuits-tokens", "4096", "--circuits-mine-tokens", "2048"], env=env, capture_output=True, text=True,
        timeout=1200,
    )
    assert circuits.returncode == 0, circuits.stderr[-3000:]
    for step in ("[circuits 1/4]", "[circuits 2/4]", "[circuits 3/4]", "[circuits 4/4]", "CE score", "faithfulness"):
        assert step in circuits.stderr
    found = re.search(r"attribution graph: http://\S+?(/graphs/[0-9a-f]+)", circuits.stderr)
    assert found, circuits.stderr[-3000:]
    with TestClient(create_app()) as client:
        graph = client.get(f"/api/v1{found.group(1)}").json()
        kinds = [n["kind"] for n in graph["nodes"]]
        assert kinds.count("embedding") == 11 and "logit" in kinds  # the Madrid prompt's 11 tokens, its top logits
        assert client.get(found.group(1)).status_code == 200
        for node in (n for n in graph["nodes"] if n["kind"] == "feature"):  # every feature's layer was mined
            assert node["sae"] and client.get(node["url"]).status_code == 200
