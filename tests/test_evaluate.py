"""Evaluation shares the model's prefix up to the hook: the results equal the plain algorithm's (the
model cut at the hook, then three full forwards), and skipping to a layer with its true output gives
the plain forward's logits, on Llama and GPT-2."""

from __future__ import annotations

import shutil
from dataclasses import asdict

import numpy as np
import pytest
import torch

from sae_core import corpus as corpus_mod
from sae_core.evaluate import EvalConfig, EvalResult, evaluate
from sae_core.interchange import load_sae
from sae_core.model import LanguageModel, parse_hook


def reference_evaluate(sae_dir, cfg: EvalConfig, lm: LanguageModel) -> EvalResult:
    """The algorithm before the prefix was shared, kept verbatim: residuals cut at the hook, then clean,
    SAE-spliced and zero-ablated full forwards through `replace_residual`."""
    sae, sae_cfg = load_sae(sae_dir)
    meta = sae_cfg["metadata"]
    cache_cfg = meta["saescope"]["cache"]
    layer = parse_hook(meta["hook_name"])
    context, skip = int(cache_cfg["context_size"]), int(cache_cfg["skip_positions"])
    corpus = corpus_mod.open_corpus(cache_cfg["corpus"])
    windows = corpus_mod.iter_windows(corpus, lm.tokenizer, context, int(cache_cfg["seed"]),
                                      skip_windows=int(meta["saescope"]["cache_windows"]))
    fired = torch.zeros(sae.cfg.n_latents, dtype=torch.long)
    sums = dict(n=0, active=0, sq_err=0.0, sum_x=torch.zeros(lm.d_model, dtype=torch.float64), sum_sq=0.0,
                ce_clean=0.0, ce_sae=0.0, ce_zero=0.0, kl=0.0, kl_zero=0.0, n_pred=0)
    n_windows, done = -(-cfg.tokens // context), 0
    with torch.inference_mode():
        while done < n_windows:
            batch = [w.tokens for _, w in zip(range(min(cfg.batch_size, n_windows - done)), windows)]
            ids = torch.from_numpy(np.concatenate(batch)).long()
            x = lm.residuals(ids, layer)[:, skip:].float().reshape(-1, lm.d_model)
            z = sae.encode(x)
            x_hat = sae(x)
            fired += (z > 0).sum(0)
            sums["n"] += len(x)
            sums["active"] += int((z > 0).sum())
            sums["sq_err"] += float((x - x_hat).pow(2).sum())
            sums["sum_x"] += x.double().sum(0)
            sums["sum_sq"] += float(x.double().pow(2).sum())

            def splice(h):
                out = h.clone()
                out[:, skip:] = sae(h[:, skip:].float()).to(h.dtype)
                return out

            def zero(h):
                out = h.clone()
                out[:, skip:] = 0
                return out

            def logprobs():
                return lm.model(input_ids=ids, use_cache=False).logits[:, skip:-1].float().log_softmax(-1)

            targets = ids[:, skip + 1:]
            clean = logprobs()
            with lm.replace_residual(layer, splice):
                spliced = logprobs()
            with lm.replace_residual(layer, zero):
                zeroed = logprobs()
            for key, lp in (("ce_clean", clean), ("ce_sae", spliced), ("ce_zero", zeroed)):
                sums[key] += float(-lp.gather(-1, targets.unsqueeze(-1)).sum())
            sums["kl"] += float((clean.exp() * (clean - spliced)).sum())
            sums["kl_zero"] += float((clean.exp() * (clean - zeroed)).sum())
            sums["n_pred"] += targets.numel()
            done += len(batch)
    n = sums["n"]
    total_var = sums["sum_sq"] - float(sums["sum_x"].pow(2).sum()) / n
    density = fired.float() / n
    ce = {k: sums[k] / sums["n_pred"] for k in ("ce_clean", "ce_sae", "ce_zero", "kl", "kl_zero")}
    return EvalResult(tokens=n, l0=sums["active"] / n, fvu=sums["sq_err"] / total_var,
                      dead_fraction=float((fired == 0).float().mean()), rare_fraction=float((density < 1e-5).float().mean()),
                      ce_clean=ce["ce_clean"], ce_sae=ce["ce_sae"], ce_zero=ce["ce_zero"], delta_ce=ce["ce_sae"] - ce["ce_clean"],
                      ce_score=(ce["ce_zero"] - ce["ce_sae"]) / max(ce["ce_zero"] - ce["ce_clean"], 1e-12), kl=ce["kl"],
                      kl_zero=ce["kl_zero"])


@pytest.fixture
def sae_copy(tiny_sae_dir, tmp_path):
    """The shared tiny SAE without its eval.json (evaluate writes one; other tests read the fixture's)."""
    out = tmp_path / "sae"
    out.mkdir()
    for name in ("cfg.json", "sae_weights.safetensors"):
        shutil.copy(tiny_sae_dir / name, out / name)
    return out


def test_shared_prefix_gives_exactly_the_plain_algorithms_results(sae_copy, tiny_lm):
    # a short last batch too; consecutive windows, as the plain algorithm reads them (the spread is tested in test_corpus.py)
    cfg = EvalConfig(tokens=32 * 12, batch_size=5, window_stride=1, device="cpu", model_dtype="float32")
    new = evaluate(sae_copy, cfg, lm=tiny_lm, progress=False)
    old = reference_evaluate(sae_copy, cfg, tiny_lm)
    # bitwise: the same layers see the same inputs (the §4 metrics, computed beside them, are tested in test_metrics.py)
    quality = ("probe_loss", "probe_tasks", "ablation_sparsity", "ablations")
    assert {k: v for k, v in asdict(new).items() if k not in quality} == {k: v for k, v in asdict(old).items() if k not in quality}
    assert new.ablation_sparsity is not None and new.probe_loss is None   # on by default; the tiny corpus has no labels
    assert new.ce_zero > new.ce_clean and new.kl > 0
    # the model is left as it was: a plain forward is unaffected
    ids = torch.arange(2 * 16).view(2, 16) % 200
    with torch.inference_mode():
        assert all("forward" not in m.__dict__ for m in tiny_lm.layers)
        torch.testing.assert_close(tiny_lm.model(input_ids=ids).logits, tiny_lm.logits_and_residual(ids, 1)[0], rtol=0, atol=0)


def tiny_gpt2() -> LanguageModel:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=97, n_positions=64, n_embd=32, n_layer=3, n_head=4)).eval()
    return LanguageModel(name="tiny-gpt2", model=model, tokenizer=None, device=torch.device("cpu"), dtype=torch.float32)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_starting_after_a_layer_with_its_true_output_gives_the_plain_logits(arch, tiny_lm):
    lm = tiny_lm if arch == "llama" else tiny_gpt2()
    ids = torch.randint(0, 90, (3, 20), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        plain = lm.model(input_ids=ids, use_cache=False).logits
        for layer in range(lm.n_layers):
            logits, h = lm.logits_and_residual(ids, layer)
            assert torch.equal(logits, plain) and torch.equal(h, lm.residuals(ids, layer))
            with lm.start_after(layer, h):
                assert torch.equal(lm.model(input_ids=ids, use_cache=False).logits, plain), layer
            with lm.start_after(layer, torch.zeros_like(h)):      # the given output is what the next layers see
                assert not torch.allclose(lm.model(input_ids=ids, use_cache=False).logits, plain)
        assert torch.equal(lm.model(input_ids=ids, use_cache=False).logits, plain)   # restored afterwards
