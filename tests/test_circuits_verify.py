"""Verifying an attribution graph by intervention (issue 29 items 3, 4; sae_core/circuits/verify.py) on the tiny
float64 Llama of test_circuits.py, made frozen-equivalent: no query/key weights (every attention pattern is uniform
whatever the input), an RMSNorm epsilon so large that each norm is a fixed scale (its nonlinearity ~1e-12 relative).
With the MLPs switched off (zero output) the real model is the frozen linear model and the ablation of a feature moves
every target by exactly -weight; with each MLP replaced by its own transcoder and an ablation small enough (1e-3 of the
activation) that no TopK slot changes, the real model moves by the graph's sum over paths. The match rule on hand-made numbers; the trace
stores the figure and the page and the API show it (the tiny trained transcoder set of test_trace.py)."""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch
from test_circuits import PROMPT, tiny_llama, trained_transcoders
from test_trace import NODES, store  # noqa: F401 (fixture: a mined store; the tiny transcoder set tc_dir is conftest's)
from test_trace import PROMPT as TRACE_PROMPT

from sae_core.circuits.attribution import AttributionConfig, attribute_with_model
from sae_core.circuits.prune import Pruned, prune
from sae_core.circuits.trace import TraceConfig, trace
from sae_core.circuits.verify import ablate_strongest, frozen_ablation, matches, verify, verify_edges
from sae_core.errors import SaescopeError
from sae_core.model import LanguageModel
from sae_core.store import db

EPS = 1e12  # RMSNorm: rsqrt(mean(h^2) + EPS) is EPS^-1/2 to ~1e-12 relative; the norm weights undo the scale
GAIN = 50.0  # the embeddings are ~0.02: the MLP inputs get an RMS near 1, as a real norm gives them, so features fire


def linearised(mlp: str) -> tuple[LanguageModel, dict]:
    """The tiny Llama with uniform attention and fixed-scale norms; mlp "off" (zero output) or "transcoder" (each MLP
    is its layer's transcoder, so the error nodes are zero)."""
    model = tiny_llama()
    transcoders = trained_transcoders(tiny_llama(), skip=False)  # trained on the ordinary model: features fire
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.zero_()
            layer.self_attn.k_proj.weight.zero_()
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.variance_epsilon = EPS
                norm.weight.mul_(EPS**0.5 * GAIN)
        model.model.norm.variance_epsilon = EPS
        model.model.norm.weight.mul_(EPS**0.5)
        for L, layer in enumerate(model.model.layers):
            if mlp == "off":
                layer.mlp.down_proj.weight.zero_()
            else:
                layer.mlp = transcoders[L]
    return LanguageModel("tiny", model, None, torch.device("cpu"), torch.float64), transcoders


def build(lm: LanguageModel, transcoders: dict):
    graph, rm = attribute_with_model(lm.model, transcoders, PROMPT, AttributionConfig(max_feature_nodes=None))
    influence = prune(graph).node_influence
    return graph, rm, Pruned(np.ones(graph.n_nodes, dtype=bool), graph.adjacency != 0, influence)  # everything kept


def test_match_rule_by_hand():
    assert matches(-2.0, -2.0) and matches(1.0, 3.0) and matches(3.0, 1.0) and matches(-0.5, -1.4)
    assert not matches(1.0, 3.01) and not matches(1.0, -1.0) and not matches(-2.0, 0.5)  # 3.01x off; opposite signs
    assert matches(0.0, 0.0) and not matches(0.0, 1e-9) and not matches(1e-9, 0.0)
    assert matches(1.0, 4.0, factor=4) and not matches(1.0, 4.0)


def test_edges_measured_equal_predicted_in_a_frozen_equivalent_model():
    lm, transcoders = linearised("off")
    graph, rm, pruned = build(lm, transcoders)
    checks = verify_edges(lm, transcoders, graph, pruned, n_edges=10_000)
    n_feature_edges = int(pruned.edge_mask[:, : graph.n_features].sum())
    assert len(checks) == n_feature_edges > 20  # every feature-source edge, the strongest first
    weights = [abs(c.weight) for c in checks]
    assert weights == sorted(weights, reverse=True)
    assert {c.target >= graph.n_features for c in checks} == {False, True}  # feature and logit targets both
    scale = max(weights)
    for c in checks:
        assert c.predicted == -c.weight
        assert abs(c.measured - c.predicted) <= 1e-6 * scale, (c, scale)  # adjacency is float32
    big = [c for c in checks if abs(c.weight) > 1e-3 * scale]
    assert all(c.match for c in big)
    result = verify(lm, rm, graph, pruned, n_edges=7)
    assert result.checked == 7 and result.share == result.matched / 7 == 1.0
    # the strongest node: with the MLPs off nothing answers it, so the real change is the direct edge's -weight
    node = result.strongest
    assert node is not None
    F = graph.n_features
    assert node.node == int(np.argmax(np.where(pruned.node_mask[:F], pruned.node_influence[:F], -np.inf)))
    assert node.predicted_direct == pytest.approx(-graph.adjacency[graph.logit_node(0), node.node], abs=1e-6 * scale)
    assert node.measured == pytest.approx(node.predicted_direct, abs=1e-9 * scale) and node.match_direct
    stored = result.to_json(np.nonzero(pruned.node_mask)[0])
    assert stored["checked"] == 7 and stored["matched"] == 7 and stored["rule"] == "same sign and within a factor of 3"


def test_strongest_node_sum_over_paths_in_a_model_made_of_its_transcoders():
    """Each MLP is its transcoder: a small ablation (1e-3 of the activation) keeps every TopK slot, so the real change
    is linear in it and equals the graph's sum over paths, later features answering; the direct-only prediction
    differs. Only layer 0's features are kept, so the strongest kept node has two layers of features after it."""
    lm, transcoders = linearised("transcoder")
    graph, rm, pruned = build(lm, transcoders)
    assert float(torch.stack([s.error for s in rm.states]).abs().max()) < 1e-9  # the replacement is the model
    small = copy.deepcopy(graph)
    small.activations = graph.activations * 1e-3
    layer0 = copy.deepcopy(pruned)
    layer0.node_mask[: graph.n_features] = graph.features[:, 0] == 0
    node = ablate_strongest(lm, rm, small, layer0)
    assert node is not None and node.layer == 0
    assert node.measured == pytest.approx(node.predicted, rel=1e-3) and node.match
    W_U = rm.unembed.weight.detach()
    direction = W_U[graph.logit_tokens[0]] - W_U.mean(0)
    assert node.predicted == pytest.approx(frozen_ablation(rm, small, node.node, direction, respond=True))
    assert node.predicted_direct == pytest.approx(frozen_ablation(rm, small, node.node, direction, respond=False))
    assert abs(node.predicted - node.predicted_direct) > 0.1 * abs(node.predicted)  # the paths through features count


def test_bad_input():
    lm, transcoders = linearised("off")
    graph, rm, pruned = build(lm, transcoders)
    with pytest.raises(SaescopeError, match="at least 1"):
        verify(lm, rm, graph, pruned, n_edges=0)
    with pytest.raises(SaescopeError, match="factor"):
        verify(lm, rm, graph, pruned, factor=0.5)
    no_edges = copy.deepcopy(pruned)
    no_edges.edge_mask[:] = False
    no_edges.node_mask[: graph.n_features] = False
    result = verify(lm, rm, graph, no_edges)
    assert result.checked == 0 and result.share is None and result.strongest is None


def test_trace_stores_the_figure_and_the_page_cli_and_api_show_it(tc_dir, store, tiny_lm, tmp_path):  # noqa: F811
    """`saescope trace` checks the graph by default (verify_edges 20) and stores the figure in the row's scores; the
    API returns it, the page's header and the CLI say it; verify_edges 0 checks nothing."""
    from fastapi.testclient import TestClient
    from sqlalchemy import select
    from typer.testing import CliRunner

    from app.main import create_app
    from sae_core.store.schema import AttributionGraphRecord
    from saescope.cli import app

    result = trace(TraceConfig(TRACE_PROMPT, tc_dir, db=store, node_threshold=NODES, force=True), lm=tiny_lm)
    v = result.verification
    assert v is not None and 0 < v["checked"] <= 20 and 0 <= v["matched"] <= v["checked"]
    assert v["share"] == v["matched"] / v["checked"] and sum(e["match"] for e in v["edges"]) == v["matched"]
    nodes = result.graph["nodes"]
    for e in v["edges"]:  # stored node ids: a feature source, a feature or logit target, the edge's stored weight
        assert nodes[e["source"]]["kind"] == "feature" and nodes[e["target"]]["kind"] in ("feature", "logit")
        assert [e["source"], e["target"], e["weight"]] in result.graph["edges"] and e["predicted"] == -e["weight"]
    assert v["strongest"] is not None and nodes[v["strongest"]["node"]]["kind"] == "feature"
    engine = db.open_store(store)
    with engine.connect() as conn:
        scores = conn.execute(select(AttributionGraphRecord.scores).where(AttributionGraphRecord.slug == result.slug)).scalar_one()
    engine.dispose()
    assert scores["verification"] == v and "verify" in scores["seconds"]
    with TestClient(create_app(store)) as client:
        page = client.get(f"/graphs/{result.slug}")
        assert page.status_code == 200
        assert f"Faithfulness: {v['matched']} of {v['checked']} checked edges match" in page.text and "factor of 3" in page.text
        assert "Ablating the strongest feature node" in page.text and "by the direct edge alone" in page.text
        assert client.get(f"/api/v1/graphs/{result.slug}").json()["verification"] == v
    unchecked = trace(TraceConfig(TRACE_PROMPT, tc_dir, db=store, node_threshold=NODES, force=True, verify_edges=0), lm=tiny_lm)
    assert unchecked.verification is None
    with TestClient(create_app(store)) as client:
        assert "Faithfulness" not in client.get(f"/graphs/{result.slug}").text
    with pytest.raises(SaescopeError, match="verify-edges"):
        TraceConfig(TRACE_PROMPT, tc_dir, verify_edges=-1)
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    out = CliRunner().invoke(app, ["trace", TRACE_PROMPT, "--transcoders", str(tc_dir), "--db", url, "--device", "cpu",
                                   "--node-threshold", str(NODES), "--verify-edges", "5"])  # fmt: skip
    assert out.exit_code == 0, out.output
    assert re.search(r"faithfulness: \d of 5 checked edges match \(sign and within 3x\)", out.output), out.output
    assert "ablating the strongest feature" in out.output
