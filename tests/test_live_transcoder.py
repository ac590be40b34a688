"""Transcoder features live (issue 29 item 3) on the tiny Llama with a transcoder trained for layer 1 and mined into a
store: the runtime reads a transcoder's code from its layer's MLP input and steers by editing that MLP's output
(y' = y + decode(z') - decode(z)), the steering API and the page's result fragment answer for it, and the graph
page's steer link opens that page prefilled with an ablation of the node's feature."""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

import pytest
import torch
from conftest import mine_tiny
from fastapi.testclient import TestClient
from test_live_api import LIMITS, wait_ready

from app.graphs import steer_url
from app.main import create_app
from sae_core.config import CacheConfig, GenerationConfig, LiveConfig, TrainConfig
from sae_core.errors import SaescopeError
from sae_core.interchange import load_sae
from sae_core.live.errors import LiveError
from sae_core.live.interventions import Intervention, SteeringHook
from sae_core.live.runtime import LiveRuntime
from sae_core.live.sweep import SweepRequest
from sae_core.model import Site
from sae_core.store import db
from sae_core.store.weights import RunSAE
from sae_core.train_transcoders import train_transcoders

TEXT = "The cat sat over the big red house. Then the king said that the whale ran under a blue tree."
GREEDY = GenerationConfig(max_new_tokens=12, temperature=0.0)
NAME = "layer_1"


@pytest.fixture(scope="module")
def tc_dir(tiny_lm, tiny_model, tiny_corpus, tmp_path_factory):
    stream = CacheConfig(model=str(tiny_model), corpus=str(tiny_corpus), hook="blocks.0.hook_resid_post", context_size=32, tokens=32 * 48)
    cfg = TrainConfig(n_latents=64, k=4, batch_size=128, lr=3e-3, checkpoint_every=100, device="cpu")
    return train_transcoders(cfg, stream, [1], tmp_path_factory.mktemp("tc") / "tc", progress=False, lm=tiny_lm).out


@pytest.fixture(scope="module")
def store(tc_dir, tiny_lm, tmp_path_factory) -> str:
    url = f"sqlite:///{tmp_path_factory.mktemp('tc-store') / 'store.db'}"
    mine_tiny(tc_dir / NAME, tiny_lm, url, windows=16)
    return url


@pytest.fixture(scope="module")
def runtime(store, tiny_lm):
    """The runtime over the store, as the model process runs it (the weights and cfg stored with the run)."""
    return LiveRuntime(LiveConfig(max_text_tokens=200, max_new_tokens_limit=64), engine=db.make_engine(store), lm=tiny_lm)


@torch.inference_mode()
def mlp_io(lm, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = lm.mlp_activations(torch.tensor([ids]), [1])[1]
    return x[0].float(), y[0].float()


@torch.inference_mode()
def strongest(runtime, ids: list[int]) -> tuple[int, torch.Tensor]:
    """The feature with the largest activation on the text (past the skipped first position), and its codes."""
    held = runtime.sae(NAME)
    z = held.loaded.sae.encode(mlp_io(runtime.lm, ids)[0])
    return int(z[held.skip :].amax(0).argmax()), z


def test_the_runtime_reads_a_transcoder_at_its_mlp_input_and_writes_its_mlp_output(runtime):
    held = runtime.sae(NAME)
    assert held.run.hook == "blocks.1.hook_mlp_in" and held.site == Site.of("blocks.1.hook_mlp_in", "blocks.1.hook_mlp_out")
    assert held.layer == 1


@torch.inference_mode()
def test_encode_is_the_transcoders_code_of_the_mlp_input(runtime, tiny_lm):
    ids = tiny_lm.tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    feature, z = strongest(runtime, ids)
    resid = runtime.lm.residuals(torch.tensor([ids]), 1)[0].float()
    assert not torch.allclose(runtime.sae(NAME).loaded.sae.encode(resid), z)  # the residual would give other codes
    result = runtime.encode(NAME, TEXT, feature=feature, top=4)
    assert [t.id for t in result.tokens] == ids
    skip = runtime.sae(NAME).skip
    for pos, tok in enumerate(result.tokens[skip:], start=skip):
        nonzero = int((z[pos] > 0).sum())
        assert len(tok.features) == min(4, nonzero)
        for f, v in tok.features:
            assert v == pytest.approx(float(z[pos, f]), rel=1e-5, abs=1e-6)
    assert result.feature_acts is not None
    assert result.feature_acts[skip:] == pytest.approx(z[skip:, feature].tolist(), rel=1e-5, abs=1e-6)
    assert max(result.feature_acts) > 0


def test_identity_interventions_leave_the_continuation_unchanged(runtime, tiny_lm):
    ids = tiny_lm.tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    feature, _ = strongest(runtime, ids)
    for ivs in ([], [Intervention(feature, "scale", 1.0)], [Intervention(feature, "add", 0.0)]):
        result = runtime.generate(NAME, TEXT, ivs, GREEDY, frozen_attention=True)
        assert result.steered.token_ids == result.default.token_ids and result.diverges_at is None, ivs
        assert result.frozen is not None and result.frozen.token_ids == result.default.token_ids


@torch.inference_mode()
def test_ablating_a_feature_edits_the_mlp_output_by_its_decoder_row_and_nothing_else(runtime, tiny_lm):
    held = runtime.sae(NAME)
    sae = held.loaded.sae
    ids = tiny_lm.tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    feature, z = strongest(runtime, ids)
    x, y = mlp_io(tiny_lm, ids)
    edited = SteeringHook(sae, [Intervention(feature, "clamp", 0.0)])(x, y)
    expected = y - z[:, feature : feature + 1] * sae.W_dec[feature].float()
    torch.testing.assert_close(edited, expected, rtol=1e-5, atol=1e-7)
    changed = (edited != y).any(-1)
    assert changed.any() and torch.equal(changed, z[:, feature] > 0)  # edited exactly where the feature is active

    def reference(_module, _args, output):  # the same edit written directly: the MLP's output minus act * W_dec[f]
        return output - z[None, :, feature : feature + 1] * sae.W_dec[feature]

    inputs = torch.tensor([ids])
    plain = tiny_lm.model(input_ids=inputs).logits
    with tiny_lm.edit(held.site, SteeringHook(sae, [Intervention(feature, "clamp", 0.0)])):
        steered = tiny_lm.model(input_ids=inputs).logits
    handle = tiny_lm.mlp(1).register_forward_hook(reference)
    try:
        by_hand = tiny_lm.model(input_ids=inputs).logits
    finally:
        handle.remove()
    torch.testing.assert_close(steered, by_hand, rtol=1e-4, atol=1e-4)
    assert (steered - plain).abs().amax() > 1e-3
    with tiny_lm.edit(held.site, SteeringHook(sae, [])):  # the empty intervention is the identity, bit for bit
        assert torch.equal(tiny_lm.model(input_ids=inputs).logits, plain)


@torch.inference_mode()
def test_cap_and_ortho_act_on_the_mlp_output(runtime, tiny_lm):
    sae = runtime.sae(NAME).loaded.sae
    ids = tiny_lm.tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    feature, _ = strongest(runtime, ids)
    x, y = mlp_io(tiny_lm, ids)
    u = sae.W_dec[feature].float() / sae.W_dec[feature].float().norm()
    zeroed = SteeringHook(sae, [Intervention(feature, "ortho", 0.0)])(x, y)
    torch.testing.assert_close(zeroed @ u, torch.zeros(len(ids)), rtol=0, atol=1e-4)
    torch.testing.assert_close(zeroed, y - (y @ u)[:, None] * u, rtol=1e-5, atol=1e-5)
    cap = float((y @ u).median())
    capped = SteeringHook(sae, [Intervention(feature, "cap", cap)])(x, y)
    assert float((capped @ u).max()) <= cap + 1e-4
    below = (y @ u) <= cap
    assert torch.equal(capped[below], y[below])


def test_steering_a_transcoder_feature_changes_the_continuation(runtime, tiny_lm):
    ids = tiny_lm.tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    feature, _ = strongest(runtime, ids)
    result = runtime.generate(NAME, TEXT, [Intervention(feature, "add", 200.0)], GREEDY, frozen_attention=True)
    assert result.steered.token_ids != result.default.token_ids and result.diverges_at is not None
    assert result.frozen is not None and len(result.frozen.token_ids) == GREEDY.max_new_tokens


def test_a_sweep_of_a_transcoder_feature_matches_single_runs_and_reads_its_lift_at_the_mlp_input(runtime, tiny_lm):
    ids = tiny_lm.tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    feature, _ = strongest(runtime, ids)
    prompts = ("The cat sat on the", "Then the king said")
    result = runtime.sweep(SweepRequest(NAME, Intervention(feature, "add", 1.0), (0.0, 200.0), prompts, (), max_new_tokens=8))
    settings = GenerationConfig(max_new_tokens=8)
    for point in result.points:
        for prompt, got in zip(prompts, point.token_ids):
            assert got == runtime.generate(NAME, prompt, [Intervention(feature, "add", point.strength or 0.0)], settings).steered.token_ids
    with torch.inference_mode():  # the baseline's lift: the feature's mean code of the MLP input on the generated tokens
        codes = []
        for prompt, new in zip(prompts, result.baseline.token_ids):
            full = tiny_lm.tokenizer(prompt, add_special_tokens=False)["input_ids"] + new
            codes.append(runtime.sae(NAME).loaded.sae.encode(mlp_io(tiny_lm, full)[0])[-len(new) :, feature])
    assert result.baseline.lift == pytest.approx(float(torch.cat(codes).mean()), rel=1e-4, abs=1e-6)


def test_feature_conditions_across_a_residual_sae_and_a_transcoder(tc_dir, tiny_sae_dir, tiny_lm):
    """A residual SAE after layer 1 may be conditioned on the layer-1 transcoder (its MLP input comes earlier in the
    forward); the transcoder on that residual SAE may not (it is read later)."""
    sources = {
        "tiny": (load_sae(tiny_sae_dir), "blocks.1.hook_resid_post"),
        NAME: (load_sae(tc_dir / NAME), "blocks.1.hook_mlp_in"),
    }

    def source(name):
        loaded, hook = sources[name]
        return RunSAE(name, 1, tiny_lm.name, hook, loaded.sae.cfg.n_latents, "folder"), loaded

    rt = LiveRuntime(LiveConfig(max_text_tokens=200, max_new_tokens_limit=64), lm=tiny_lm, sae_source=source)
    ids = tiny_lm.tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    feature, _ = strongest(rt, ids)
    plain = Intervention(3, "add", 200.0)
    always = Intervention.parse(f"3:add:200@{NAME}:{feature}>-1")
    never = Intervention.parse(f"3:add:200@{NAME}:{feature}>100000")
    steered = rt.generate("tiny", TEXT, [plain], GREEDY).steered.token_ids
    assert rt.generate("tiny", TEXT, [always], GREEDY).steered.token_ids == steered
    result = rt.generate("tiny", TEXT, [never], GREEDY)
    assert result.steered.token_ids == result.default.token_ids != steered
    with pytest.raises(LiveError, match="later hook"):
        rt.generate(NAME, TEXT, [Intervention.parse(f"{feature}:clamp:0@tiny:3>0")], GREEDY)
    own = rt.generate(NAME, TEXT, [Intervention.parse(f"{feature}:add:200@{feature}>100000")], GREEDY)
    assert own.steered.token_ids == own.default.token_ids  # a condition on the transcoder's own feature, never holding


def test_steering_api_and_the_graph_links_page_answer_for_a_transcoder(store, runtime, tiny_lm):
    ids = tiny_lm.tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    feature, _ = strongest(runtime, ids)
    with TestClient(create_app(store, live_config=LIMITS)) as client:
        wait_ready(client)
        body = {"sae": NAME, "prompt": TEXT, "max_new_tokens": 8, "interventions": [{"feature": feature, "mode": "add", "value": 200}]}
        r = client.post("/api/v1/steer", json=body)
        assert r.status_code == 200, r.text
        answer = r.json()
        assert answer["default"]["token_ids"] and answer["steered"]["token_ids"] != answer["default"]["token_ids"]
        acts = client.post(f"/api/v1/saes/{NAME}/activations", json={"text": TEXT, "feature": feature})
        assert acts.status_code == 200, acts.text

        link = steer_url(NAME, feature, TEXT)  # what a graph node's steer link opens
        page = client.get(link)
        assert page.status_code == 200 and f'value="{feature}"' in page.text
        query = parse_qs(urlsplit(link).query)
        assert query["mode"] == ["clamp"] and query["value"] == ["0"] and query["prompt"] == [TEXT]
        form = {key: values[0] for key, values in query.items()} | {"max_new_tokens": "8"}
        fragment = client.post(f"/saes/{NAME}/steer/result", data=form)
        assert fragment.status_code == 200 and 'id="steer-steered"' in fragment.text and 'id="steer-default"' in fragment.text
        plain = client.post("/api/v1/steer", json={**body, "interventions": []}).json()
        generated = plain["default"]["token_ids"]
        assert generated and all(f'title="token {t}"' in fragment.text for t in generated)  # a real continuation, not an error
        assert f"{len(generated)} tokens · stopped:" in fragment.text


@torch.inference_mode()
def test_edit_sites_of_an_mlp_and_the_pairs_that_cannot_be_edited(tiny_lm):
    inputs = torch.tensor([tiny_lm.tokenizer(TEXT, add_special_tokens=False)["input_ids"]])
    x, y = tiny_lm.mlp_activations(inputs, [2])[2]
    seen: list[torch.Tensor] = []
    with tiny_lm.watch("blocks.2.hook_mlp_in", lambda a: seen.append(a.clone())), tiny_lm.watch("blocks.2.hook_mlp_out", seen.append):
        plain = tiny_lm.model(input_ids=inputs).logits
    torch.testing.assert_close(seen[0], x, rtol=0, atol=0)
    torch.testing.assert_close(seen[1], y, rtol=0, atol=0)
    handle = tiny_lm.mlp(2).register_forward_hook(lambda _m, _a, out: out * 0)
    try:
        ablated = tiny_lm.model(input_ids=inputs).logits
    finally:
        handle.remove()
    with tiny_lm.edit(Site.of("blocks.2.hook_mlp_out"), lambda a, w: w * 0):  # an SAE of the MLP output edits it in place
        assert torch.equal(tiny_lm.model(input_ids=inputs).logits, ablated)
    handle = tiny_lm.mlp(2).register_forward_pre_hook(lambda _m, args: (args[0] * 2,))
    try:
        doubled_in = tiny_lm.model(input_ids=inputs).logits
    finally:
        handle.remove()
    with tiny_lm.edit(Site.of("blocks.2.hook_mlp_in"), lambda a, w: w * 2):  # an SAE of the MLP input edits what the MLP reads
        assert torch.equal(tiny_lm.model(input_ids=inputs).logits, doubled_in)
    assert not torch.equal(doubled_in, plain)
    for reads, writes in (("blocks.1.hook_mlp_in", "blocks.2.hook_mlp_out"), ("blocks.1.hook_resid_post", "blocks.1.hook_mlp_out")):
        with pytest.raises(SaescopeError, match="cannot be edited live"):
            Site.of(reads, writes)
