"""The causal check on the bundled SmolLM2-135M with a really trained SAE: steering features whose logit
effects promote a token raises that token's probability (measured, asserted). The SAE is trained here on
the demo corpus at layer 26 of 30, where a feature's direct logit effect (W_dec @ W_U, what the feature
page lists) is most of its effect on the output (a few minutes on 2 CPU cores)."""

from __future__ import annotations

import statistics

import pytest
import torch

from sae_core.cache import CacheConfig, build_cache
from sae_core.config import GenerationConfig, LiveConfig
from sae_core.interchange import load_sae
from sae_core.live.interventions import Intervention, SteeringHook
from sae_core.live.runtime import LiveRuntime
from sae_core.model import load_model
from sae_core.store.weights import RunSAE
from sae_core.train import TrainConfig, train

pytestmark = pytest.mark.real_model
HOOK, LAYER = "blocks.26.hook_resid_post", 26
PROMPTS = ["I went to the store and bought some", "The weather today is", "He said that the ship", "In the year 1850, the"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("real-sae")
    lm = load_model("smollm2-135m", "cpu", "auto")
    cfg = CacheConfig(hook=HOOK, tokens=32_000, batch_size=16, windows_per_shard=64, dtype="bfloat16")
    build_cache(cfg, root / "cache", lm=lm, progress=False)
    train(TrainConfig(n_latents=1024, k=32, batch_size=1024, tokens=100_000, bf16=True), root / "cache", root / "sae", progress=False)
    loaded = load_sae(root / "sae")
    run = RunSAE("real", 1, lm.name, HOOK, 1024, str(root / "sae"))
    return lm, loaded, LiveRuntime(LiveConfig(), lm=lm, sae_source=lambda name: (run, loaded))


@torch.no_grad()
def next_token_probs(lm, prompt: str, hook=None) -> torch.Tensor:
    x = torch.tensor([lm.tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    if hook is None:
        return lm.model(input_ids=x).logits[0, -1].float().softmax(-1)
    with lm.replace_residual(LAYER, hook):
        return lm.model(input_ids=x).logits[0, -1].float().softmax(-1)


def test_steering_a_feature_raises_the_probability_of_the_token_it_promotes(trained):
    lm, loaded, _ = trained
    sae = loaded.sae
    effects = lm.unembed_directions(sae.W_dec.detach())  # the feature page's logit effects
    strength, promoted = effects.max(1)
    text = "The old man walked to the harbour and looked at the sea. The ships came in slowly with their catch."
    with torch.no_grad():
        z = sae.encode(lm.residuals(torch.tensor([lm.tokenizer(text, add_special_tokens=False)["input_ids"]]), LAYER)[0, 1:].float())
    alive = (z > 0).any(0).nonzero().squeeze(1)
    features = alive[strength[alive].argsort(descending=True)][:5].tolist()  # the strongest promoters among live features
    typical = float(z[z > 0].median())
    ratios = []
    for f in features:
        token = int(promoted[f])
        for prompt in PROMPTS:
            before = float(next_token_probs(lm, prompt)[token])
            after = float(next_token_probs(lm, prompt, SteeringHook(sae, [Intervention(f, "add", 20 * typical)]))[token])
            ratios.append(after / before)
    # measured: the promoted token's probability, steered over unsteered, for 5 features x 4 prompts
    print("probability ratios", [f"{r:.3g}" for r in ratios])
    assert statistics.median(ratios) > 5
    assert sum(r > 1 for r in ratios) >= 0.7 * len(ratios)  # measured: 20 and 17 of 20 in two trainings


def test_steering_changes_the_real_continuation_and_empty_steering_does_not(trained):
    lm, loaded, runtime = trained
    settings = GenerationConfig(max_new_tokens=8)
    plain = runtime.generate("real", PROMPTS[0], [], settings)
    assert plain.steered.token_ids == plain.default.token_ids and plain.diverges_at is None
    f = int(lm.unembed_directions(loaded.sae.W_dec.detach()).max(1).values.argmax())
    steered = runtime.generate("real", PROMPTS[0], [Intervention(f, "add", 60.0)], settings)
    assert steered.steered.token_ids != steered.default.token_ids
