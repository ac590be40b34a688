"""k-sparse probing (SAEBench's sparse_probing eval; Gurnee et al. 2023; sae-probes, Kantamneni et al.
2025): how well k latents of the SAE classify a labelled property, for k = 1, 2, 5, 20.

Per binary task, on the train split: the k latents of the largest |mean over positives - mean over
negatives| (SAEBench's `get_top_k_mean_diff_mask`), then an L2 logistic regression on those k latents
(sklearn, C = 1, as SAEBench's `train_sklearn_probe`); the score is its accuracy on the test split.
The same regression on the model's own activations at the hook (every dimension) is the ceiling
(`llm_probe_accuracy`), and on every latent the SAE's own (`sae_probe_accuracy`).

Tasks are what the corpus labels (sae_core/metrics/labels.py): per token, the six Brown part-of-speech
tasks (a word's last token) and each corpus source; mean-pooled, each source again over a window's
run of tokens from one document (SAEBench mean-pools a text's latents). Each task is balanced (as many
positives as negatives) in both splits, and the split is by window: no window gives tokens to both,
so a probe never sees the test text's neighbours. Classes are drawn with the suite's seed.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..corpus import Windows
from ..metrics.labels import NO_LABEL, POS_TASKS, TokenLabeller

if TYPE_CHECKING:
    from ..sae.base import DictionarySAE

KS = (1, 2, 5, 20)
MIN_PER_CLASS = 8  # per split: fewer positives (or negatives) than this and the task is left out
MIN_SEGMENT = 8  # tokens of one document in a window for a pooled example


@dataclass
class Task:
    name: str
    mode: str  # "token" or "pooled"
    train: tuple[np.ndarray, np.ndarray]  # (rows, 0/1 labels) into the mode's examples
    test: tuple[np.ndarray, np.ndarray]


class ProbingCollector:
    """Collects labelled held-out activations during evaluation (an `evaluate.Observer`)."""

    def __init__(self, labeller: TokenLabeller, max_tokens: int):
        self.labeller, self.max_tokens = labeller, max_tokens
        self.x: list[torch.Tensor] = []  # labelled tokens' activations
        self.pos: list[np.ndarray] = []
        self.source: list[np.ndarray] = []
        self.window: list[np.ndarray] = []
        self.pooled_x: list[torch.Tensor] = []  # per segment: mean activation and mean code
        self.pooled_z: list[torch.Tensor] = []
        self.pooled_source: list[int] = []
        self.pooled_window: list[int] = []
        self.windows_seen = 0
        self.tokens = 0

    def __call__(self, batch: Windows, skip: int, x: torch.Tensor, z: torch.Tensor, x_hat: torch.Tensor) -> None:
        if self.tokens >= self.max_tokens:
            return
        doc_index, doc_offset = batch.doc_index[:, skip:], batch.doc_offset[:, skip:]
        per_window = doc_index.shape[1]
        labels = self.labeller.label(doc_index.reshape(-1), doc_offset.reshape(-1))
        window = np.repeat(np.arange(self.windows_seen, self.windows_seen + len(batch)), per_window)
        keep = np.flatnonzero((labels.pos != NO_LABEL) | (labels.source != NO_LABEL))
        if len(keep):
            self.x.append(x[torch.from_numpy(keep).to(x.device)].float().cpu())
            self.pos.append(labels.pos[keep])
            self.source.append(labels.source[keep])
            self.window.append(window[keep])
        source = labels.source.reshape(len(batch), per_window)
        for w in range(len(batch)):
            docs = doc_index[w]
            for doc in np.unique(docs):
                cols = np.flatnonzero((docs == doc) & (doc_offset[w] >= 0))
                if len(cols) >= MIN_SEGMENT and source[w, cols[0]] != NO_LABEL:
                    rows = torch.from_numpy(w * per_window + cols).to(x.device)
                    self.pooled_x.append(x[rows].float().mean(0).cpu())
                    self.pooled_z.append(z[rows].float().mean(0).cpu())
                    self.pooled_source.append(int(source[w, cols[0]]))
                    self.pooled_window.append(self.windows_seen + w)
        self.windows_seen += len(batch)
        self.tokens += x.shape[0]

    def tasks(self, per_class: int, seed: int) -> tuple[list[Task], dict]:
        """The balanced binary tasks with their train/test rows; and the data they index."""
        rng = np.random.default_rng(seed)
        test_window = rng.permutation(max(self.windows_seen, 1)) % 2 == 1  # half the windows are test
        tasks: list[Task] = []
        data: dict = {}
        if self.x:
            pos, source, window = np.concatenate(self.pos), np.concatenate(self.source), np.concatenate(self.window)
            data["token"] = torch.cat(self.x)
            tagged, labelled = pos != NO_LABEL, source != NO_LABEL
            candidates = [(f"pos: {name}", pos == i, tagged & (pos != i)) for i, name in enumerate(POS_TASKS)]
            if len(self.labeller.sources) > 1:
                candidates += [(f"source: {s}", source == i, labelled & (source != i)) for i, s in enumerate(self.labeller.sources)]
            tasks += [t for t in (self._task(n, "token", p, q, test_window[window], per_class, rng) for n, p, q in candidates) if t]
        if self.pooled_x and len(self.labeller.sources) > 1:
            source, window = np.array(self.pooled_source), np.array(self.pooled_window)
            data["pooled_x"], data["pooled_z"] = torch.stack(self.pooled_x), torch.stack(self.pooled_z)
            for i, s in enumerate(self.labeller.sources):
                task = self._task(f"source: {s}", "pooled", source == i, source != i, test_window[window], per_class, rng)
                if task:
                    tasks.append(task)
        return tasks, data

    @staticmethod
    def _task(
        name: str, mode: str, positive: np.ndarray, negative: np.ndarray, is_test: np.ndarray, per_class: int, rng: np.random.Generator
    ) -> Task | None:
        splits = []
        for test in (False, True):
            p, q = np.flatnonzero(positive & (is_test == test)), np.flatnonzero(negative & (is_test == test))
            n = min(len(p), len(q), per_class)
            if n < MIN_PER_CLASS:
                return None
            rows = np.concatenate([rng.choice(p, n, replace=False), rng.choice(q, n, replace=False)])
            splits.append((rows, np.concatenate([np.ones(n, np.int64), np.zeros(n, np.int64)])))
        return Task(name, mode, splits[0], splits[1])


def top_k_mean_diff(acts: np.ndarray, y: np.ndarray, k: int) -> np.ndarray:
    """The k columns of the largest |mean over positives - mean over negatives| (SAEBench's selection)."""
    diff = np.abs(acts[y == 1].mean(0) - acts[y == 0].mean(0))
    return np.argsort(-diff, kind="stable")[:k]


def probe_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray) -> float:
    """Test accuracy of an L2 logistic regression (C = 1, SAEBench's settings) fitted on the train split."""
    from sklearn.linear_model import LogisticRegression

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence warnings on separable data: the probe still classifies
        probe = LogisticRegression(C=1.0, max_iter=1000).fit(train_x, train_y)
    return float((probe.predict(test_x) == test_y).mean())


def sparse_probe(
    train_z: np.ndarray, train_y: np.ndarray, test_z: np.ndarray, test_y: np.ndarray, ks: Iterable[int] = KS
) -> dict[str, float]:
    """Per k: the test accuracy of the probe on the top-k mean-difference latents (and on every latent)."""
    out = {}
    for k in ks:
        cols = top_k_mean_diff(train_z, train_y, k)
        out[f"top{k}"] = probe_accuracy(train_z[:, cols], train_y, test_z[:, cols], test_y)
    return out


@torch.no_grad()
def run_sparse_probing(collector: ProbingCollector, sae: DictionarySAE, per_class: int, seed: int) -> tuple[dict[str, float], dict]:
    """Flat metrics (sparse_probing_top{k}_accuracy, llm_probe_accuracy, sae_probe_accuracy: means over
    tasks) and per-task details; ({}, {...}) when the corpus has no labelled task."""
    tasks, data = collector.tasks(per_class, seed)
    details: dict = {"tasks": [], "ks": list(KS)}
    if not tasks:
        details["skipped"] = "no labelled task with enough examples in the held-out tokens"
        return {}, details
    device = sae.W_enc.device

    def encode(x: torch.Tensor) -> np.ndarray:
        return torch.cat([sae.encode(x[i : i + 4096].to(device)).float().cpu() for i in range(0, len(x), 4096)]).numpy()

    for t in tasks:
        if t.mode == "token":  # each task's rows encoded on their own: all labelled tokens' codes at once would not fit
            x = data["token"]
            train_x, test_x = x[t.train[0]].numpy(), x[t.test[0]].numpy()
            train_z, test_z = encode(x[t.train[0]]), encode(x[t.test[0]])
        else:
            train_x, test_x = data["pooled_x"].numpy()[t.train[0]], data["pooled_x"].numpy()[t.test[0]]
            train_z, test_z = data["pooled_z"].numpy()[t.train[0]], data["pooled_z"].numpy()[t.test[0]]
        (ytr, yte) = t.train[1], t.test[1]
        row = {"name": t.name, "mode": t.mode, "train": len(ytr), "test": len(yte)}
        row.update(sparse_probe(train_z, ytr, test_z, yte))
        row["sae"] = probe_accuracy(train_z, ytr, test_z, yte)
        row["llm"] = probe_accuracy(train_x, ytr, test_x, yte)
        details["tasks"].append(row)
    rows = details["tasks"]
    metrics = {f"sparse_probing_top{k}_accuracy": float(np.mean([r[f"top{k}"] for r in rows])) for k in KS}
    metrics["sae_probe_accuracy"] = float(np.mean([r["sae"] for r in rows]))
    metrics["llm_probe_accuracy"] = float(np.mean([r["llm"] for r in rows]))
    for mode in ("token", "pooled"):
        sub = [r for r in rows if r["mode"] == mode]
        if sub:
            details[f"{mode}_mean"] = {key: float(np.mean([r[key] for r in sub])) for key in [f"top{k}" for k in KS] + ["sae", "llm"]}
    return metrics, details
