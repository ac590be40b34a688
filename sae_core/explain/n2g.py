"""N2G explanations (Neuron to Graph, Foote et al. 2023, as Gao et al. 2024 §4.4 use it to measure
explainability): a feature's explanation is a small set of token patterns, each the token it fires on
with the preceding tokens that matter and wildcards where a position does not; it predicts "fires"
wherever a pattern matches, and is scored by the precision and recall of that prediction on held-out
positions.

Pruning without the model. N2G prunes a top context by re-running the model on ever shorter suffixes
and keeps the shortest one that still activates the feature. Doing that for every feature of a 16k-latent
SAE costs millions of forward passes; instead we read the answer from the mined data itself. A causal
model's activation at a position depends only on the tokens up to it, and the store holds the feature's
activation at every position of every mined context (top and interval samples, ~2,600 labelled positions
per feature, most of them not firing). So a suffix "keeps the activation" when the positions of the
build half that end in the same suffix fire: of the *other* build positions matching the pattern, at least
`min_precision` fire (leaving the context itself out, so a suffix seen nowhere else is no evidence, and
estimated with Laplace's rule of succession, so one coincidence is not enough either).
Each build context is pruned to the shortest such suffix ending at its peak (at most `max_len` tokens;
at each length first with the tokens between the first and the activating one as wildcards, then with
all of them), then each interior token becomes a wildcard when the pattern still meets that precision.
The patterns form a trie rooted at the activating token (stored as its list of root-to-leaf paths).

A position "fires" when the activation exceeds `fire_fraction` of the feature's max activation (N2G's
convention, 0.5). Scoring uses only the held-out half: its firing positions and the positions of the
same contexts where the feature does not fire. Those negatives sit next to activations, so they are
harder than random corpus positions and precision is if anything understated relative to the corpus
base rate; recall is measured on held-out activations of every strength above the threshold.

Patterns are matched by hashing: for each (length, wildcard mask) every position's suffix gets one
uint64 hash, so building and scoring a feature is a handful of numpy passes over its [E, C] arrays.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base import Explained, FeatureContexts, Scored, f1

_MULT = np.random.default_rng(0x5AE).integers(1, 2**62, size=64, dtype=np.int64).astype(np.uint64) | np.uint64(1)


@dataclass
class N2GSettings:
    fire_fraction: float = 0.5
    max_len: int = 5
    min_precision: float = 0.7
    max_patterns: int = 10


def kept_offsets(n: int, mask: int) -> list[int]:
    """Offsets back from the activating token (0) that a pattern of length n keeps; bit j of mask keeps
    offset j + 1 among the interior ones. The first token (offset n - 1) is always kept: without it the
    pattern would be a shorter one."""
    return [0] + [o for o in range(1, n - 1) if mask >> (o - 1) & 1] + ([n - 1] if n > 1 else [])


def full_mask(n: int) -> int:
    return (1 << max(n - 2, 0)) - 1


def pattern_key(tokens: list[int | None]) -> tuple[int, int, int]:
    """(n, mask, hash) of a stored pattern (tokens left to right, None for a wildcard), as SuffixIndex hashes it."""
    n = len(tokens)
    back = tokens[::-1]  # back[o]: the token o positions before the activating one
    mask = sum(1 << (o - 1) for o in range(1, n - 1) if back[o] is not None)
    h = np.uint64(0)
    with np.errstate(over="ignore"):
        for o in kept_offsets(n, mask):
            h += np.uint64(int(back[o]) + 1) * _MULT[o]  # type: ignore[arg-type]
    return n, mask, int(h)


class SuffixIndex:
    """Hashes of every position's suffix patterns over a feature's contexts, computed once per (n, mask)."""

    def __init__(self, tokens: np.ndarray, max_len: int):
        e, c = tokens.shape
        self.shifted = np.full((max_len, e, c), -1, dtype=np.int64)  # shifted[o][e, p] = tokens[e, p - o]
        for o in range(min(max_len, c)):
            self.shifted[o, :, o:] = tokens[:, : c - o]
        self._cache: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}

    def hashes(self, n: int, mask: int) -> tuple[np.ndarray, np.ndarray]:
        """(hash [E, C], matchable [E, C]): matchable where the pattern's first and last tokens exist."""
        key = (n, mask)
        if key not in self._cache:
            offsets = kept_offsets(n, mask)
            ok = (self.shifted[0] >= 0) & (self.shifted[n - 1] >= 0)
            h = np.zeros(ok.shape, dtype=np.uint64)
            for o in offsets:
                h += (self.shifted[o] + 1).astype(np.uint64) * _MULT[o]
            self._cache[key] = (h, ok)
        return self._cache[key]


class _BuildStats:
    """Per (n, mask): at each build position, the share of the *other* build positions with the same pattern
    that fire, with Laplace's rule of succession ((fired + 1) / (matches + 2)): leaving the position out
    matters, as a pattern seen only in its own context would otherwise "keep the activation" with no
    evidence at all, and the +1/+2 asks for more than one coincidence (1 of 1 gives 0.67, 2 of 2 0.75)."""

    def __init__(self, index: SuffixIndex, rows: np.ndarray, fires: np.ndarray):
        self.index, self.rows, self.fires = index, rows, fires
        self._cache: dict[tuple[int, int], np.ndarray] = {}

    def precision(self, n: int, mask: int) -> np.ndarray:
        key = (n, mask)
        if key not in self._cache:
            h, ok = self.index.hashes(n, mask)
            sel = ok & self.rows[:, None]
            _, inverse, counts = np.unique(h[sel], return_inverse=True, return_counts=True)
            own = self.fires[sel]
            fired = np.bincount(inverse, weights=own, minlength=len(counts))
            out = np.full(h.shape, np.nan)
            out[sel] = (fired[inverse] - own + 1) / (counts[inverse] - 1 + 2)
            self._cache[key] = out
        return self._cache[key]


class N2GExplainer:
    """Builds the patterns from the build half of a feature's contexts; scores them on the held-out half."""

    method = "n2g"

    def __init__(self, settings: N2GSettings | None = None):
        self.settings = settings or N2GSettings()

    def prepare(self, batch: list[FeatureContexts]) -> None:
        """N2G needs nothing beyond each feature's own contexts."""

    def fires(self, feature: FeatureContexts) -> np.ndarray:
        return feature.acts > self.settings.fire_fraction * feature.max_act

    def explain(self, feature: FeatureContexts, build: np.ndarray) -> Explained:
        s = self.settings
        fires = self.fires(feature)
        index = SuffixIndex(feature.tokens, s.max_len)
        stats = _BuildStats(index, build, fires)
        found: dict[tuple[int, int, int], dict] = {}
        for e in np.flatnonzero(build):
            p = int(np.argmax(feature.acts[e]))
            if not fires[e, p]:
                continue
            chosen = None
            for n in range(1, min(s.max_len, p + 1) + 1):  # prune: the shortest suffix that keeps it firing
                if feature.tokens[e, p - n + 1] < 0:
                    break
                # at each length the skeleton first (activating and first token, wildcards between), then every token
                for mask in dict.fromkeys((0, full_mask(n))):
                    if stats.precision(n, mask)[e, p] >= s.min_precision:
                        chosen = (n, mask)
                        break
                if chosen:
                    break
            if chosen is None:
                continue  # no suffix of up to max_len tokens predicts this activation: it stays unexplained
            n, mask = chosen
            for o in range(1, n - 1):  # generalise: wildcard an interior token where that keeps the precision
                trial = mask & ~(1 << (o - 1))
                if trial != mask and stats.precision(n, trial)[e, p] >= s.min_precision:
                    mask = trial
            h = int(index.hashes(n, mask)[0][e, p])
            key = (n, mask, h)
            if key not in found:
                kept = set(kept_offsets(n, mask))
                tokens = [int(feature.tokens[e, p - o]) if o in kept else None for o in range(n - 1, -1, -1)]
                found[key] = {"tokens": tokens, "examples": 0}
            found[key]["examples"] += 1
        best = sorted(found.items(), key=lambda kv: (-kv[1]["examples"], kv[0][0]))[: s.max_patterns]
        patterns = []
        for (n, mask, h), q in best:  # the build half's counts, for the reader: how often it matched and fired there
            hashes, ok = index.hashes(n, mask)
            match = ok & build[:, None] & (hashes == np.uint64(h))
            patterns.append({**q, "matches": int(match.sum()), "fired": int((match & fires).sum())})
        return Explained(text="", patterns=patterns)

    def predict(self, feature: FeatureContexts, patterns: list[dict]) -> np.ndarray:
        """[E, C] bool: positions where some pattern matches."""
        index = SuffixIndex(feature.tokens, self.settings.max_len)
        pred = np.zeros(feature.tokens.shape, dtype=bool)
        by_shape: dict[tuple[int, int], list[int]] = {}
        for q in patterns:
            n, mask, key = pattern_key(q["tokens"])
            by_shape.setdefault((n, mask), []).append(key)
        for (n, mask), wanted in by_shape.items():
            hashes, ok = index.hashes(n, mask)
            pred |= ok & np.isin(hashes, np.array(wanted, dtype=np.uint64))
        return pred

    def score(self, feature: FeatureContexts, explained: Explained, held_out: np.ndarray) -> Scored:
        sel = held_out[:, None] & (feature.tokens >= 0)
        fires = self.fires(feature)[sel]
        pred = self.predict(feature, explained.patterns)[sel]
        tp, predicted, positives = int((pred & fires).sum()), int(pred.sum()), int(fires.sum())
        precision = tp / predicted if predicted else None
        recall = tp / positives if positives else None
        counts = {"positions": int(sel.sum()), "firing": positives, "predicted": predicted, "true_positives": tp}
        return Scored(precision, recall, f1(precision, recall), {"f1": f1(precision, recall), **counts})
