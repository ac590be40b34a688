"""Suggested supernodes (issue 29 item 3): sae_core/circuits/supernodes.py on hand-made graphs (a shared explanation,
near decoders and co-firing each group nodes; unrelated or far-apart nodes stay apart), the endpoint on a graph traced
on the tiny model (200 with decoder cosines that match the weights, 404, 422), and the page: merging two pinned nodes
and accepting a suggestion each draw one labelled node that the URL keeps, with no console error."""

from __future__ import annotations

import numpy as np
import pytest
from test_trace import NODES, PROMPT, store, traced  # noqa: F401 - module fixtures reused (tc_dir: conftest)

from sae_core.circuits.supernodes import FeatureNode, SupernodeConfig, normalise, suggest, text_jaccard
from sae_core.errors import SaescopeError


def test_shared_explanation_groups_nodes_and_labels_them():
    nodes = [
        FeatureNode(1, layer=2, pos=3, feature=10, influence=0.2, explanation="mentions of cats"),
        FeatureNode(2, layer=5, pos=4, feature=77, influence=0.5, explanation="Mentions of cats."),
        FeatureNode(3, layer=3, pos=3, feature=11, influence=0.9, explanation="numbers in dates"),
    ]
    (s,) = suggest(nodes)
    assert s.members == [2, 1] and s.label == "Mentions of cats." and s.influence == pytest.approx(0.7)
    assert [(r.kind, r.value) for r in s.reasons] == [("explanation", 1.0)]
    assert normalise("  Mentions, of CATS! ") == "mentions of cats"
    assert text_jaccard("the cat sat", "the cat ran") == pytest.approx(0.5)
    # near but not equal wording: Jaccard 3/4 links at the default 0.6, not at 0.8
    near = [FeatureNode(1, 0, 0, 1, explanation="city names in Europe"), FeatureNode(2, 0, 1, 2, explanation="city names Europe")]
    assert suggest(near)[0].reasons[0].value == pytest.approx(0.75)
    assert suggest(near, SupernodeConfig(explanation_jaccard=0.8)) == []


def test_near_decoders_group_within_a_layer_only():
    rng = np.random.default_rng(0)
    d = rng.standard_normal(16)
    other = rng.standard_normal(16)
    other -= (other @ d) / (d @ d) * d  # orthogonal to d
    near = d + 0.3 * other / np.linalg.norm(other) * np.linalg.norm(d)
    cos = float(near @ d / np.linalg.norm(near) / np.linalg.norm(d))
    decoders = {4: {1: d, 2: near, 3: other}, 5: {9: d}}
    nodes = [FeatureNode(10, 4, 2, 1), FeatureNode(11, 4, 3, 2), FeatureNode(12, 4, 2, 3), FeatureNode(13, 5, 2, 9)]
    (s,) = suggest(nodes, decoders=decoders)
    assert sorted(s.members) == [10, 11] and s.reasons[0].kind == "decoder" and s.reasons[0].value == pytest.approx(cos, abs=1e-4)
    assert cos > 0.9  # layer 5's feature 9 has d itself as its decoder, but another layer's dictionary does not count
    assert s.label == "L4 #1/2"
    assert suggest(nodes, SupernodeConfig(decoder_cosine=0.99), decoders=decoders) == []
    # the same feature at adjacent positions is one feature (cosine 1), weights or not
    same = suggest([FeatureNode(1, 0, 5, 7, top_token=" Paris"), FeatureNode(2, 0, 6, 7, top_token=" Paris")])
    assert same[0].reasons[0].value == 1.0 and same[0].label == "fires on ' Paris'"


def test_cofiring_groups_and_position_gap_separates():
    cofire = {1: {5: {6: 0.55, 7: 0.05}}}
    nodes = [FeatureNode(1, 1, 0, 5), FeatureNode(2, 1, 1, 6), FeatureNode(3, 1, 1, 7), FeatureNode(4, 1, 9, 6)]
    (s,) = suggest(nodes, cofire=cofire)
    assert sorted(s.members) == [1, 2] and [(r.kind, r.value) for r in s.reasons] == [("cofire", 0.55)]
    wide = suggest(nodes, SupernodeConfig(max_pos_gap=9), cofire=cofire)
    assert sorted(wide[0].members) == [1, 2, 4]  # node 4 (same feature as 2, far off) joins only with a wide gap


def test_unrelated_nodes_and_bad_settings():
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.standard_normal((8, 8)))
    nodes = [FeatureNode(i, 0, i % 2, i, explanation=text) for i, text in enumerate(["cats", "dates", "verbs", "French words"])]
    assert suggest(nodes, decoders={0: {i: q[i] for i in range(4)}}, cofire={0: {0: {1: 0.01}}}) == []
    for bad in ({"decoder_cosine": 0.0}, {"explanation_jaccard": 1.5}, {"max_pos_gap": -1}):
        with pytest.raises(SaescopeError, match=next(iter(bad))):
            SupernodeConfig(**bad)
    with pytest.raises(SaescopeError, match="unique"):
        suggest([FeatureNode(1, 0, 0, 1), FeatureNode(1, 0, 0, 2)])


@pytest.fixture(scope="module")
def traced_complete(tc_dir, store, tiny_lm):  # noqa: F811
    """The graph with position 0 attributed too: the tiny graph then holds a feature firing at two neighbouring
    positions, which the endpoint's "same feature" grouping needs to be seen."""
    from sae_core.circuits.trace import TraceConfig, trace

    return trace(TraceConfig(PROMPT, tc_dir, db=store, node_threshold=NODES, attribute_position_0=True), lm=tiny_lm), None


def test_endpoint_on_a_traced_graph(traced_complete, store, tc_dir):  # noqa: F811
    from fastapi.testclient import TestClient
    from sqlalchemy import create_engine, select

    from app.main import create_app
    from sae_core.interchange import load_sae
    from sae_core.store.schema import SAE, Feature

    result, _ = traced_complete
    nodes = {n["id"]: n for n in result.graph["nodes"]}
    layers = {n["layer"] for n in nodes.values() if n["kind"] == "feature"}
    engine = create_engine(store)
    with engine.connect() as conn:  # layer 1 is mined: its co-activation rows are what the endpoint should quote
        run_id = conn.execute(select(SAE.active_run_id).where(SAE.name == "layer_1")).scalar_one()
        coact = {
            i: {p[0]: p[3] for p in rows or []}
            for i, rows in conn.execute(select(Feature.index, Feature.coactivation).where(Feature.run_id == run_id))
        }
    engine.dispose()
    with TestClient(create_app(store)) as client:
        # low thresholds, so that the tiny graph's pairs of distinct features link and their numbers can be checked
        got = client.get(f"/api/v1/graphs/{result.slug}/supernodes", params={"decoder_cosine": 0.01, "cofire_jaccard": 0.01})
        assert got.status_code == 200, got.text
        body = got.json()
        assert set(body["decoder_sources"]) == {str(layer) for layer in layers} and 1 in layers
        assert body["decoder_sources"]["1"].startswith("store: layer_1")  # the mined run's weights, the others the folder's
        assert all(v.startswith("folder: ") for k, v in body["decoder_sources"].items() if k != "1")
        assert body["cofire_layers"] == [1]
        kinds: dict[str, int] = {}
        for s in body["suggestions"]:
            assert len(s["members"]) >= 2 and all(nodes[m]["kind"] == "feature" for m in s["members"]) and s["label"]
            for r in s["reasons"]:
                a, b = nodes[r["source"]], nodes[r["target"]]
                assert abs(a["pos"] - b["pos"]) <= 1 and r["source"] in s["members"] and r["target"] in s["members"]
                if r["kind"] == "decoder" and a["feature"] != b["feature"]:
                    assert a["layer"] == b["layer"] and r["value"] >= 0.01
                    w = load_sae(tc_dir / f"layer_{a['layer']}").sae.W_dec.detach().double().numpy()
                    u, v = w[a["feature"]], w[b["feature"]]
                    assert r["value"] == pytest.approx(u @ v / np.linalg.norm(u) / np.linalg.norm(v), abs=1e-3)
                elif r["kind"] == "cofire":
                    assert a["layer"] == b["layer"] == 1
                    expected = max(coact[a["feature"]].get(b["feature"], 0), coact[b["feature"]].get(a["feature"], 0))
                    assert r["value"] == pytest.approx(expected, abs=1e-4) and expected >= 0.01
                key = "same feature" if r["kind"] == "decoder" and a["feature"] == b["feature"] else r["kind"]
                kinds[key] = kinds.get(key, 0) + 1
        assert {"decoder", "cofire", "same feature"} <= set(kinds), kinds
        default = client.get(f"/api/v1/graphs/{result.slug}/supernodes").json()
        assert 1 <= len(default["suggestions"]) <= len(body["suggestions"])
        missing = client.get("/api/v1/graphs/0123456789ab/supernodes")
        assert missing.status_code == 404 and "no attribution graph" in missing.text and "0123456789ab" in missing.text
        for bad in ({"decoder_cosine": 2}, {"cofire_jaccard": 0}, {"max_pos_gap": -1}):
            assert client.get(f"/api/v1/graphs/{result.slug}/supernodes", params=bad).status_code == 422


def test_merge_and_accept_in_a_browser(traced_complete, store, browser):  # noqa: F811
    from conftest import ARTIFACTS, LiveServer

    from app.main import create_app

    result, _ = traced_complete
    server = LiveServer(create_app(store))
    try:
        page = browser.new_page(viewport={"width": 1300, "height": 900})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("console", lambda m: errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
        page.goto(f"{server.url}/graphs/{result.slug}")
        page.wait_for_selector("#graph-svg .node.feature")
        page.wait_for_function("!document.getElementById('graph-suggest-status').textContent.includes('loading')")
        n_features = page.locator("#graph-svg .node.feature").count()
        assert n_features >= 2
        feats = page.locator("#graph-svg .node.feature")
        ids = [int(feats.nth(i).get_attribute("data-node")) for i in (0, 1)]
        for i in (0, 1):
            feats.nth(i).click(modifiers=["Shift"])
        page.fill("#graph-group-label", "my cats")
        page.click("#graph-merge")
        supernode = page.locator("#graph-svg .node.supernode")
        assert supernode.count() == 1 and supernode.text_content() == "my cats"
        assert page.locator("#graph-svg .node.feature").count() == n_features - 2
        assert all(page.locator(f'#graph-svg [data-node="{i}"]').count() == 0 for i in ids)
        assert "group=my%20cats~" in page.url and "pin=" not in page.url
        supernode.hover()
        assert 'supernode "my cats" (2 nodes)' in page.locator("#graph-tip").inner_text()
        page.screenshot(path=str(ARTIFACTS / "graph_supernode.png"), full_page=True)
        page.reload()  # the link keeps the view
        page.wait_for_selector("#graph-svg .node.supernode")
        assert page.locator("#graph-svg .node.supernode").text_content() == "my cats"
        page.click("#graph-group-list button.ungroup")
        assert page.locator("#graph-svg .node.supernode").count() == 0 and page.locator("#graph-svg .node.feature").count() == n_features
        page.wait_for_function("!document.getElementById('graph-suggest-status').textContent.includes('loading')")
        suggestions = page.locator("#graph-suggest-list li.suggestion")
        n_suggested = suggestions.count()
        assert n_suggested >= 1  # at the defaults: the same layer-0 feature on the prompt's first two tokens
        members = page.evaluate("fetch(document.getElementById('attribution-graph').dataset.src + '/supernodes').then(r => r.json())")
        first = members["suggestions"][0]["members"]
        suggestions.first.locator("input").fill("accepted group")
        suggestions.first.locator("button.accept").click()
        assert page.locator("#graph-svg .node.supernode").text_content() == "accepted group"
        assert all(page.locator(f'#graph-svg [data-node="{i}"]').count() == 0 for i in first)
        assert "group=accepted%20group~" in page.url and suggestions.count() == n_suggested - 1
        page.screenshot(path=str(ARTIFACTS / "graph_supernode_accepted.png"), full_page=True)
        rename = page.locator("#graph-group-list li.group input")
        rename.fill("renamed")
        rename.press("Enter")  # change fires: the drawn label and the link follow
        assert page.locator("#graph-svg .node.supernode").text_content() == "renamed" and "group=renamed~" in page.url
        page.click("#graph-group-list button.ungroup")  # the suggestion comes back; dismissing it clears the list
        assert suggestions.count() == n_suggested
        for _ in range(n_suggested):
            suggestions.first.locator("button.dismiss").click()
        assert suggestions.count() == 0 and "all accepted or dismissed" in page.locator("#graph-suggest-list").inner_text()
        assert "group=" not in page.url and page.locator("#graph-svg .node.supernode").count() == 0
        assert errors == []
        page.close()
    finally:
        server.stop()
