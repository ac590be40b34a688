"""Held-out windows spread over the corpus (`corpus.spread_windows`, what evaluation reads): one window in
every `stride` after the start, the stride shrunk to fit where the corpus has fewer windows left."""

from __future__ import annotations

import numpy as np
import pytest

from sae_core import corpus as corpus_mod
from sae_core.errors import SaescopeError

CONTEXT = 32


@pytest.fixture(scope="module")
def windows(tiny_corpus, tiny_lm):
    """Every window of the tiny corpus, in order, with the corpus they come from."""
    corpus = corpus_mod.open_corpus(str(tiny_corpus))
    return corpus, list(corpus_mod.iter_windows(corpus, tiny_lm.tokenizer, CONTEXT, seed=0))


def spread(windows, tiny_lm, start: int, n: int, stride: int) -> list[corpus_mod.Windows]:
    corpus, _ = windows
    return list(corpus_mod.spread_windows(corpus, tiny_lm.tokenizer, CONTEXT, 0, start, n, stride))


def positions(windows, picked: list[corpus_mod.Windows]) -> list[int]:
    """Where each picked window sits among all of them (its tokens and provenance equal that window's)."""
    everything = windows[1]
    found = []
    for w in picked:
        match = [
            i
            for i, v in enumerate(everything)
            if all(np.array_equal(getattr(w, f), getattr(v, f)) for f in ("tokens", "doc_index", "doc_offset"))
        ]
        assert len(match) == 1
        found.append(match[0])
    return found


def test_one_window_in_every_stride_after_the_start(windows, tiny_lm):
    total = len(windows[1])
    assert total > 200
    assert positions(windows, spread(windows, tiny_lm, 10, 12, 1)) == list(range(10, 22))  # stride 1: consecutive
    assert positions(windows, spread(windows, tiny_lm, 10, 12, 16)) == list(range(10, 10 + 12 * 16, 16))


def test_the_stride_shrinks_to_fit_the_windows_left(windows, tiny_lm):
    total = len(windows[1])
    start = total - 100  # 100 windows left: 12 of them one in every 8, not one in every 16 (which would give 7)
    assert positions(windows, spread(windows, tiny_lm, start, 12, 16)) == list(range(start, start + 12 * 8, 8))
    assert positions(windows, spread(windows, tiny_lm, total - 5, 12, 16)) == list(range(total - 5, total))  # fewer than asked: all
    assert spread(windows, tiny_lm, total, 12, 16) == []


def test_batches_of_windows_keep_their_provenance(windows):
    parts = windows[1][3:7]
    batch = corpus_mod.Windows.cat(parts)
    assert len(batch) == 4 and batch.tokens.shape == (4, CONTEXT)
    assert np.array_equal(batch.doc_offset[2], parts[2].doc_offset[0]) and np.array_equal(batch.doc_index[3], parts[3].doc_index[0])


def test_a_stride_below_one_is_refused(windows, tiny_lm):
    with pytest.raises(SaescopeError, match="at least 1"):
        spread(windows, tiny_lm, 0, 4, 0)
