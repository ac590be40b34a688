"""The live runtime's mechanics on the tiny random Llama and its trained tiny SAE: encoding a text, and
steering at the hook (empty = unsteered exactly; clamp/add/scale change the residual as defined)."""

from __future__ import annotations

import pytest
import torch

from sae_core.config import GenerationConfig, LiveConfig
from sae_core.interchange import load_sae, load_sae_bytes, sae_bytes
from sae_core.live.errors import LiveError, NotFound
from sae_core.live.interventions import Intervention, SteeringHook
from sae_core.live.runtime import LiveRuntime
from sae_core.store.weights import RunSAE

TEXT = "The cat sat over the big red house. Then the king said that the whale ran under a blue tree."


@pytest.fixture(scope="module")
def runtime(tiny_lm, tiny_sae_dir):
    loaded = load_sae(tiny_sae_dir)
    run = RunSAE("tiny", 1, tiny_lm.name, "blocks.1.hook_resid_post", loaded.sae.cfg.n_latents, str(tiny_sae_dir))
    return LiveRuntime(LiveConfig(max_text_tokens=200, max_new_tokens_limit=64), lm=tiny_lm, sae_source=lambda name: (run, loaded))


@torch.no_grad()
def code(rt, text):
    held = rt.sae("tiny")
    ids = rt.lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    x = rt.lm.residuals(torch.tensor([ids]), held.layer)[0]
    return held.loaded.sae.encode(x.float()), ids


def test_encode_lists_each_tokens_strongest_features_and_a_features_activation(runtime):
    z, ids = code(runtime, TEXT)
    result = runtime.encode("tiny", TEXT, feature=int(z[1:].amax(0).argmax()), top=4)
    assert [t.id for t in result.tokens] == ids
    assert result.tokens[0].skipped and result.tokens[0].features == []  # the attention sink, as in training
    for pos, tok in enumerate(result.tokens[1:], start=1):
        assert 0 < len(tok.features) <= 4
        best_value, best_feature = z[pos].max(0)
        assert tok.features[0] == (int(best_feature), pytest.approx(float(best_value)))
        assert [v for _, v in tok.features] == sorted((v for _, v in tok.features), reverse=True)
    assert result.feature_acts is not None and max(result.feature_acts) == pytest.approx(float(z[1:, result.feature].max()))


def test_encode_gives_several_features_at_once_as_one_each(runtime):
    """A feature list's page asks for all of an SAE's entries in one encode: the same values as one by one."""
    z, _ = code(runtime, TEXT)
    strongest = z[1:].amax(0).topk(2).indices.tolist()
    features = [strongest[0], 3, strongest[1]]
    result = runtime.encode("tiny", TEXT, top=1, features=features)
    assert result.features == features and result.features_acts is not None
    for f, acts in zip(result.features, result.features_acts):
        assert acts == pytest.approx(runtime.encode("tiny", TEXT, feature=f).feature_acts)
    assert any(max(acts) > 0 for acts in result.features_acts)  # not vacuously equal
    assert all(acts[0] == 0.0 for acts in result.features_acts) and result.tokens[0].skipped  # the attention sink reads 0
    with pytest.raises(NotFound):
        runtime.encode("tiny", TEXT, features=[3, 128])


def test_encode_rejects_bad_input(runtime):
    with pytest.raises(NotFound):
        runtime.encode("tiny", TEXT, feature=128)
    with pytest.raises(LiveError, match="empty"):
        runtime.encode("tiny", "")


def test_a_text_past_the_token_cap_is_read_up_to_it(runtime):
    whole = runtime.lm.tokenizer("the cat " * 300, add_special_tokens=False)["input_ids"]
    result = runtime.encode("tiny", "the cat " * 300, feature=3)
    assert len(result.tokens) == 200 and result.truncated == len(whole) - 200 > 0
    assert [t.id for t in result.tokens] == whole[:200]
    assert result.feature_acts is not None and len(result.feature_acts) == 200
    assert runtime.encode("tiny", TEXT).truncated == 0


def test_a_prompt_past_the_token_cap_is_continued_from_its_end(tiny_lm, runtime):
    short = LiveRuntime(LiveConfig(max_prompt_tokens=6), lm=tiny_lm, sae_source=runtime._source)
    prompt = "the king said that the whale ran over the big red house"
    ids = tiny_lm.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    result = short.generate("tiny", prompt, [], GREEDY)
    assert result.prompt_truncated == len(ids) - 6 > 0 and len(result.prompt_tokens) == 6
    assert result.default.token_ids == short.continue_(tiny_lm, ids[-6:], GREEDY, None, 1).token_ids


GREEDY = GenerationConfig(max_new_tokens=24)
SAMPLED = GenerationConfig(max_new_tokens=24, temperature=0.9, top_p=0.9, seed=7)


@pytest.mark.parametrize("settings", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_an_empty_intervention_gives_exactly_the_unsteered_tokens(runtime, settings):
    held = runtime.sae("tiny")
    ids = runtime.lm.tokenizer("the cat sat", add_special_tokens=False)["input_ids"]
    plain = runtime.continue_(runtime.lm, ids, settings, None, held.layer)  # no hook registered at all
    hooked = runtime.continue_(runtime.lm, ids, settings, SteeringHook(held.loaded.sae, []), held.layer)
    assert plain.token_ids == hooked.token_ids and len(plain.token_ids) > 0
    result = runtime.generate("tiny", "the cat sat", [], settings)
    assert result.default.token_ids == result.steered.token_ids == plain.token_ids and result.diverges_at is None


def test_clamping_to_zero_a_feature_that_never_fires_changes_nothing(runtime):
    z, _ = code(runtime, "the cat sat over the house and the dog ran")
    silent = int((z.amax(0) == 0).nonzero()[0])
    result = runtime.generate("tiny", "the cat sat over the house and the dog ran", [Intervention(silent, "clamp", 0.0)], GREEDY)
    assert result.steered.token_ids == result.default.token_ids
    # and at the hook the residual is bitwise unchanged
    hook = SteeringHook(runtime.sae("tiny").loaded.sae, [Intervention(silent, "clamp", 0.0)])
    x = runtime.lm.residuals(torch.tensor([[5, 9, 20, 31]]), 1)
    assert torch.equal(hook(x), x)


def steered_residual(runtime, interventions, text=TEXT):
    """(the hook's input, what the next layer receives) on one forward with the hook in place."""
    held = runtime.sae("tiny")
    ids = torch.tensor([runtime.lm.tokenizer(text, add_special_tokens=False)["input_ids"]])
    seen = []
    with runtime.lm.replace_residual(held.layer, lambda h: (seen.append(h.clone()), SteeringHook(held.loaded.sae, interventions)(h))[1]):
        handle = runtime.lm.layers[held.layer + 1].register_forward_pre_hook(lambda _m, args, *rest: seen.append(args[0].clone()))
        try:
            runtime.lm.model(input_ids=ids, use_cache=False)
        finally:
            handle.remove()
    return seen[0][0], seen[1][0], held.loaded.sae


def test_clamp_add_and_scale_do_what_they_say_at_the_hook(runtime):
    z, _ = code(runtime, TEXT)
    f = int(z[1:].amax(0).argmax())  # a feature that fires on this text
    for iv in (Intervention(f, "clamp", 5.0), Intervention(f, "add", 3.0), Intervention(f, "scale", -2.0)):
        x, steered, sae = steered_residual(runtime, [iv])
        z_f = sae.encode(x)[:, f]
        assert (z_f > 0).any()
        expected_code = {"clamp": torch.full_like(z_f, 5.0), "add": z_f + 3.0, "scale": -2.0 * z_f}[iv.mode]
        # x' = x + (decode(z') - decode(z)): the change is along W_dec[f] by exactly z'_f - z_f, everywhere
        torch.testing.assert_close(steered - x, (expected_code - z_f)[:, None] * sae.W_dec[f], rtol=1e-4, atol=1e-5)
        # the reconstruction error is kept: x' - decode(z') equals x - decode(z)
        z_new = sae.encode(x).clone()
        z_new[:, f] = expected_code
        torch.testing.assert_close(steered - (z_new @ sae.W_dec + sae.b_pre), x - sae(x), rtol=1e-4, atol=1e-4)


def test_steering_hard_changes_the_continuation_and_marks_where(runtime):
    z, _ = code(runtime, TEXT)
    f = int(z[1:].amax(0).argmax())
    result = runtime.generate("tiny", "the cat sat", [Intervention(f, "add", 200.0)], GREEDY)
    assert result.steered.token_ids != result.default.token_ids
    i = result.diverges_at
    assert i is not None and result.steered.token_ids[:i] == result.default.token_ids[:i]


def test_a_stop_request_ends_generation_early(runtime):
    calls = []
    result = runtime.continue_(
        runtime.lm, [5, 9, 20], GenerationConfig(max_new_tokens=60), None, 1, lambda: "cancelled" if len(calls.append(1) or calls) >= 3 else None
    )
    assert result.stopped == "cancelled" and len(result.token_ids) <= 4


def test_generate_validates_limits(runtime):
    with pytest.raises(LiveError, match="max_new_tokens"):
        runtime.generate("tiny", "the cat", [], GenerationConfig(max_new_tokens=65))
    with pytest.raises(NotFound):
        runtime.generate("tiny", "the cat", [Intervention(999, "clamp", 1.0)], GREEDY)
    with pytest.raises(LiveError, match="out of range"):
        runtime.generate("tiny", "the cat", [Intervention(3, "clamp", 1e6)], GREEDY)
    with pytest.raises(LiveError, match="FEATURE:MODE:VALUE"):
        Intervention.parse("3:boost:1")
    assert Intervention.parse("5475:clamp:40") == Intervention(5475, "clamp", 40.0)
    assert Intervention.parse(" 7:scale:-0.5 ").spec() == "7:scale:-0.5"


def test_interventions_on_one_feature_compose_in_order(runtime):
    """clamp 2 then add 40 is clamp 42; add 40 then clamp 2 is clamp 2: the order given is the order applied."""
    held = runtime.sae("tiny")
    sae = held.loaded.sae
    h = runtime.lm.residuals(torch.tensor([runtime.lm.tokenizer(TEXT, add_special_tokens=False)["input_ids"]]), held.layer)[0]

    def steer(*ivs):
        return SteeringHook(sae, list(ivs))(h)

    clamp42, clamp2 = steer(Intervention(3, "clamp", 42.0)), steer(Intervention(3, "clamp", 2.0))
    torch.testing.assert_close(steer(Intervention(3, "clamp", 2.0), Intervention(3, "add", 40.0)), clamp42)
    torch.testing.assert_close(steer(Intervention(3, "add", 40.0), Intervention(3, "clamp", 2.0)), clamp2)
    assert not torch.allclose(clamp2, clamp42)
    both = steer(Intervention(3, "clamp", 42.0), Intervention(5, "scale", 0.0))  # other features keep their own slot
    torch.testing.assert_close(both, steer(Intervention(5, "scale", 0.0), Intervention(3, "clamp", 42.0)))
    composed = runtime.generate("tiny", "the cat sat", [Intervention(3, "clamp", 2.0), Intervention(3, "add", 40.0)], GREEDY)
    assert composed.steered.token_ids == runtime.generate("tiny", "the cat sat", [Intervention(3, "clamp", 42.0)], GREEDY).steered.token_ids


def test_weights_round_trip_through_bytes(tiny_sae_dir):
    loaded = load_sae(tiny_sae_dir)
    again = load_sae_bytes(sae_bytes(loaded))
    for name in ("W_enc", "W_dec", "b_enc", "b_pre"):
        assert torch.equal(getattr(loaded.sae, name), getattr(again.sae, name))
    assert again.provenance == loaded.provenance and again.sae.cfg.k == loaded.sae.cfg.k
    with pytest.raises(Exception, match="safetensors"):
        load_sae_bytes(b"not a file at all")


def test_the_demo_steering_example_is_found_from_the_store(mined_store, tiny_lm):
    from sqlalchemy import create_engine, text

    from sae_core.live.example import MULTIPLE, WORDS, find_feature, steering_example

    engine = create_engine(mined_store)
    assert find_feature(engine, "tiny-sae") is None  # no single token of the tiny vocabulary is one of the demo's words
    with engine.connect() as conn:  # the tiny store's most frequent peak token, and its strongest feature there
        (peak,) = conn.execute(text(
            "SELECT v.text FROM token_features t JOIN vocab v ON v.token_id = t.token_id "
            "ORDER BY t.n_examples DESC, t.max_act DESC LIMIT 1")).one()
    words = ("no such word", peak, *WORDS)
    feature, word, max_act = find_feature(engine, "tiny-sae", words)
    assert word == peak and max_act > 0
    example = steering_example(engine, "tiny-sae", tiny_lm, max_new_tokens=6, words=words)
    request = example.request
    assert request.feature == feature and request.intervention == Intervention(feature, "clamp", round(MULTIPLE * max_act, 1))
    assert request.permalink.startswith("/saes/tiny-sae/steer?prompt=My+favourite+thing+to+talk+about+is&feature=")
    assert f"feature={feature}&mode=clamp&value={request.intervention.value:g}" in request.permalink
    assert (example.result.diverges_at is None) == (example.result.steered.token_ids == example.result.default.token_ids)
    assert example.result.default.token_ids


def test_the_model_process_answers_loading_until_its_model_is_ready(runtime, tmp_path):
    """While it loads, the model process refuses at once with a loading 503 and a Retry-After (the client
    raises Loading) instead of holding the request for the whole load; once loaded it answers."""
    import asyncio
    import socket
    import threading

    from sae_core.live.errors import Loading
    from sae_core.live.pool import LOADING_RETRY_AFTER, LiveClient, ModelServer

    server = ModelServer(runtime, LiveConfig(live_queue=2))
    path = str(tmp_path / "model.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(8)

    def accept():
        while True:
            conn, _ = listener.accept()
            threading.Thread(target=server.handle, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    threading.Thread(target=server.run_jobs, daemon=True).start()
    client = LiveClient(path)
    request = {"op": "encode", "sae": "tiny", "text": TEXT, "feature": None, "top": 3}
    assert server.state == "loading" and asyncio.run(client.call({"op": "status"}))["state"] == "loading"
    with pytest.raises(Loading, match="the model is loading") as refused:
        asyncio.run(client.call(request))
    assert refused.value.status == 503 and refused.value.retry_after == LOADING_RETRY_AFTER
    server.load()  # what the model process's load thread does at start
    assert server.state == "ready" and asyncio.run(client.call(request))["tokens"]
    with pytest.raises(Loading, match="starting"):  # no model process listening yet
        asyncio.run(LiveClient(str(tmp_path / "not-yet.sock")).call(request))
    listener.close()
