"""The explainer interface, after delphi's split: an Explainer turns a feature's mined contexts into an
explanation; a Scorer measures how well that explanation predicts the feature on contexts it was not
built from. The stage (`stage.py`) reads contexts from the store, calls both and writes the result."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np


@dataclass
class FeatureContexts:
    """A feature's mined contexts as arrays: `tokens` [E, C] int64 (-1 pads a shorter context on the
    left), `acts` [E, C] float32, and per example its kind ("top" or "interval") and rank. `max_act` is
    the feature's largest activation over all mined positions (features.max_act)."""

    index: int
    max_act: float
    tokens: np.ndarray
    acts: np.ndarray
    kinds: list[str]
    ranks: np.ndarray
    intervals: np.ndarray  # interval number per example, -1 for top contexts

    def split(self) -> tuple[np.ndarray, np.ndarray]:
        """Boolean masks (build, held out) over the examples: alternate ranks within each kind and interval,
        so both halves span the same activation range and the held-out half was never seen while building."""
        held_out = self.ranks % 2 == 1
        return ~held_out, held_out


@dataclass
class Explained:
    """What an explainer produces, before scoring."""

    text: str  # one line
    patterns: list[dict] = field(default_factory=list)
    usage: dict = field(default_factory=dict)  # e.g. tokens an LLM used


@dataclass
class Scored:
    precision: float | None
    recall: float | None
    score: float | None  # the one number to sort by
    scores: dict = field(default_factory=dict)


class Explainer(Protocol):
    method: str

    def prepare(self, batch: list[FeatureContexts]) -> None:
        """Called with each batch's contexts before its features are explained (e.g. to draw negatives)."""

    def explain(self, feature: FeatureContexts, build: np.ndarray) -> Explained: ...


class Scorer(Protocol):
    def score(self, feature: FeatureContexts, explained: Explained, held_out: np.ndarray) -> Scored: ...


def f1(precision: float | None, recall: float | None) -> float | None:
    if precision is None or recall is None:
        return None
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
