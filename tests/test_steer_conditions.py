"""Conditional interventions, the residual modes (cap, ortho) and frozen attention on the tiny Llama and its
tiny SAE: a condition that never holds changes nothing (bitwise), one that always holds equals the
unconditional intervention; cap leaves components below it untouched and caps the rest (on the residual)."""

from __future__ import annotations

import pytest
import torch

from sae_core.config import GenerationConfig, LiveConfig
from sae_core.interchange import load_sae
from sae_core.live.errors import LiveError
from sae_core.live.interventions import Condition, Intervention, SteeringHook
from sae_core.live.runtime import LiveRuntime
from sae_core.store.weights import RunSAE

TEXT = "The cat sat over the big red house. Then the king said that the whale ran under a blue tree."
GREEDY = GenerationConfig(max_new_tokens=16)
PROMPT = "the cat sat over the house and the dog ran"


@pytest.fixture(scope="module")
def runtime(tiny_lm, tiny_sae_dir):
    loaded = load_sae(tiny_sae_dir)
    runs = {
        "tiny": RunSAE("tiny", 1, tiny_lm.name, "blocks.1.hook_resid_post", loaded.sae.cfg.n_latents, str(tiny_sae_dir)),
        # the same weights read at layer 0: a condition SAE at an earlier hook (widths match; what it means is beside the point)
        "early": RunSAE("early", 2, tiny_lm.name, "blocks.0.hook_resid_post", loaded.sae.cfg.n_latents, str(tiny_sae_dir)),
        "late": RunSAE("late", 3, tiny_lm.name, "blocks.2.hook_resid_post", loaded.sae.cfg.n_latents, str(tiny_sae_dir)),
    }
    return LiveRuntime(LiveConfig(max_new_tokens_limit=64), lm=tiny_lm, sae_source=lambda name: (runs[name], loaded))


def firing_feature(runtime, text=TEXT) -> int:
    held = runtime.sae("tiny")
    ids = runtime.lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    z = held.loaded.sae.encode(runtime.lm.residuals(torch.tensor([ids]), held.layer)[0].float())
    return int(z[1:].amax(0).argmax())


def test_specs_round_trip_and_old_specs_stay_valid():
    assert Intervention.parse("5475:clamp:40") == Intervention(5475, "clamp", 40.0)
    cases = {
        "5:add:8@gen": Intervention(5, "add", 8.0, Condition("generated")),
        "5:scale:-2@prompt": Intervention(5, "scale", -2.0, Condition("prompt")),
        "5:cap:1.5@12>0.5": Intervention(5, "cap", 1.5, Condition("feature", 12, 0.5)),
        "5:ortho:0@other-sae.v2:12>-1": Intervention(5, "ortho", 0.0, Condition("feature", 12, -1.0, "other-sae.v2")),
    }
    for spec, iv in cases.items():
        assert Intervention.parse(spec) == iv and Intervention.parse(iv.spec()) == iv
    for bad in ("5:clamp:1@", "5:clamp:1@later", "5:push:1", "5:clamp:1@12>"):
        with pytest.raises(LiveError):
            Intervention.parse(bad)


@pytest.mark.parametrize("never", ["feature", "prompt_only_in_generation"])
def test_a_condition_that_never_holds_changes_nothing_bitwise(runtime, never):
    f = firing_feature(runtime)
    if never == "feature":
        cond = Condition("feature", f, 1e5)  # far above any activation
    else:
        cond = Condition("prompt")  # a prompt condition, checked on the generated tokens' forward only below
    iv = Intervention(f, "add", 300.0, cond)
    held = runtime.sae("tiny")
    ids = runtime.lm.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    if never == "feature":
        result = runtime.generate("tiny", PROMPT, [iv], GREEDY)
        assert result.steered.token_ids == result.default.token_ids and result.diverges_at is None
        x = runtime.lm.residuals(torch.tensor([ids]), held.layer)
        assert torch.equal(SteeringHook(held.loaded.sae, [iv], len(ids))(x), x)
    else:  # positions past the prompt: a prompt-only condition leaves them bit for bit
        hook = SteeringHook(held.loaded.sae, [iv], prompt_len=len(ids))
        hook.seen = len(ids)
        x = runtime.lm.residuals(torch.tensor([ids]), held.layer)[:, -3:]
        assert torch.equal(hook(x), x)


def test_a_condition_that_always_holds_equals_the_unconditional_intervention(runtime):
    f = firing_feature(runtime)
    plain = Intervention(f, "add", 60.0)
    unconditional = runtime.generate("tiny", PROMPT, [plain], GREEDY)
    assert unconditional.steered.token_ids != unconditional.default.token_ids  # the intervention does something
    for cond in (Condition("feature", f, -1e5), Condition("feature", f, -1e5, "early"), Condition("feature", f, -1e5, "tiny")):
        result = runtime.generate("tiny", PROMPT, [Intervention(f, "add", 60.0, cond)], GREEDY)
        assert result.steered.token_ids == unconditional.steered.token_ids, cond
    held = runtime.sae("tiny")
    x = runtime.lm.residuals(torch.tensor([runtime.lm.tokenizer(TEXT, add_special_tokens=False)["input_ids"]]), held.layer)
    torch.testing.assert_close(
        SteeringHook(held.loaded.sae, [Intervention(f, "add", 60.0, Condition("feature", f, -1e5))])(x),
        SteeringHook(held.loaded.sae, [plain])(x),
        rtol=0,
        atol=0,
    )


def test_gen_and_prompt_conditions_split_the_positions(runtime):
    f = firing_feature(runtime)
    held = runtime.sae("tiny")
    ids = runtime.lm.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    x = runtime.lm.residuals(torch.tensor([ids]), held.layer)
    plain = SteeringHook(held.loaded.sae, [Intervention(f, "add", 10.0)])(x)
    gen = SteeringHook(held.loaded.sae, [Intervention(f, "add", 10.0, Condition("generated"))], prompt_len=4)(x)
    prompt = SteeringHook(held.loaded.sae, [Intervention(f, "add", 10.0, Condition("prompt"))], prompt_len=4)(x)
    assert torch.equal(gen[:, :4], x[:, :4]) and torch.equal(gen[:, 4:], plain[:, 4:])
    assert torch.equal(prompt[:, :4], plain[:, :4]) and torch.equal(prompt[:, 4:], x[:, 4:])
    # in a generation: a gen-only intervention leaves the continuation's start as the prompt-only one's end would be
    only_gen = runtime.generate("tiny", PROMPT, [Intervention(f, "add", 300.0, Condition("generated"))], GREEDY)
    assert only_gen.steered.token_ids[0] == only_gen.default.token_ids[0]  # the first token is read off the prompt's positions
    assert only_gen.steered.token_ids != only_gen.default.token_ids


def test_a_feature_condition_applies_only_where_the_feature_fires(runtime):
    f = firing_feature(runtime)
    held = runtime.sae("tiny")
    x = runtime.lm.residuals(torch.tensor([runtime.lm.tokenizer(TEXT, add_special_tokens=False)["input_ids"]]), held.layer)
    acts = held.loaded.sae.encode(x.float())[..., f]
    out = SteeringHook(held.loaded.sae, [Intervention(f, "add", 10.0, Condition("feature", f, 0.0))])(x)
    plain = SteeringHook(held.loaded.sae, [Intervention(f, "add", 10.0)])(x)
    on = acts > 0
    assert on.any() and (~on).any()
    assert torch.equal(out[~on], x[~on]) and torch.equal(out[on], plain[on])


def test_a_condition_on_a_later_hook_or_unknown_sae_is_refused(runtime):
    with pytest.raises(LiveError, match="later hook"):
        runtime.generate("tiny", PROMPT, [Intervention(3, "add", 1.0, Condition("feature", 3, 0.0, "late"))], GREEDY)


def test_projection_cap_leaves_components_below_it_and_caps_the_rest_on_the_residual(runtime):
    f = firing_feature(runtime)
    held = runtime.sae("tiny")
    sae = held.loaded.sae
    x = runtime.lm.residuals(torch.tensor([runtime.lm.tokenizer(TEXT, add_special_tokens=False)["input_ids"]]), held.layer)[0]
    u = sae.W_dec.detach()[f].float() / sae.W_dec.detach()[f].float().norm()
    p = x.float() @ u
    cap = float(p.median())  # half the positions above, half below
    out = SteeringHook(sae, [Intervention(f, "cap", cap)])(x)
    below, above = p <= cap, p > cap
    assert below.any() and above.any()
    assert torch.equal(out[below], x[below])  # untouched, bit for bit
    torch.testing.assert_close(out[above] @ u, torch.full_like(p[above], cap), rtol=1e-5, atol=1e-4)  # capped exactly at the cap
    rest = lambda v: v - (v @ u)[:, None] * u  # noqa: E731  the part orthogonal to the direction is kept
    torch.testing.assert_close(rest(out[above]), rest(x[above]), rtol=1e-5, atol=1e-4)


def test_ortho_scales_the_component_along_the_direction_and_keeps_the_rest(runtime):
    f = firing_feature(runtime)
    held = runtime.sae("tiny")
    sae = held.loaded.sae
    x = runtime.lm.residuals(torch.tensor([runtime.lm.tokenizer(TEXT, add_special_tokens=False)["input_ids"]]), held.layer)[0]
    u = sae.W_dec.detach()[f].float() / sae.W_dec.detach()[f].float().norm()
    P = torch.outer(u, u)
    for s in (0.0, 3.0, -1.0):
        out = SteeringHook(sae, [Intervention(f, "ortho", s)])(x)
        expected = x @ (torch.eye(len(u)) - P).T + s * (x @ P.T)  # Neuronpedia's (I - P)h + s Ph
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(SteeringHook(sae, [Intervention(f, "ortho", 1.0)])(x), x, rtol=0, atol=1e-5)


def test_frozen_attention_returns_both_runs_and_replays_the_unsteered_patterns(runtime):
    f = firing_feature(runtime)
    impl = runtime.lm.model.config._attn_implementation
    empty = runtime.generate("tiny", PROMPT, [], GREEDY, frozen_attention=True)
    assert empty.frozen is not None and empty.frozen.token_ids == empty.default.token_ids  # its own patterns: the default run
    result = runtime.generate("tiny", PROMPT, [Intervention(f, "add", 60.0)], GREEDY, frozen_attention=True)
    assert result.frozen is not None and len(result.frozen.token_ids) == len(result.steered.token_ids)
    assert result.steered.token_ids != result.default.token_ids
    assert result.frozen.token_ids != result.default.token_ids and result.frozen_diverges_at is not None
    assert runtime.lm.model.config._attn_implementation == impl  # the attention implementation is back to what it was


def test_a_threshold_past_the_float_range_holds_as_the_largest_finite_one_and_reads_back():
    """The API's pattern admits any digits ('-4812.e88538' overflows to -inf): such a condition is the one at
    the largest finite threshold (activations are finite, so it holds in the same places), and its spec parses
    back to it; a threshold of inf would neither read back nor go out as JSON. Found by the contract test."""
    import sys

    low = Condition.parse("85911 \f\n> \x0b-4812.e88538")
    high = Condition.parse("3>1e999")
    assert (low.threshold, high.threshold) == (-sys.float_info.max, sys.float_info.max)
    for c in (low, high, Condition.parse("3>0.5")):
        assert Condition.parse(c.spec()) == c
