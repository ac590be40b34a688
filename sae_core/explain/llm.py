"""LLM explanations, for those who have a model behind an OpenAI-compatible chat endpoint (a hosted API,
llama.cpp's server, vLLM, ...). As Neuronpedia and delphi (Paulo et al. 2024, "Automatically
Interpreting Millions of Features in LLMs") do: the explainer sees top and interval examples with the
activating tokens marked <<like this>> and writes one line; two scorers then ask the same endpoint to use
that line on held-out examples the explainer never saw:

- detection: a shuffled batch of held-out activating contexts and non-activating ones (other features'
  top contexts: for a sparse feature almost surely silent there); the model says which fit the
  explanation. Score: balanced accuracy.
- fuzzing: held-out activating contexts, half with their activating tokens marked, half with as many
  other tokens marked; the model says which are marked correctly. Score: balanced accuracy.

precision and recall are detection's (how many contexts called activating are, how many activating ones
it finds); the sort score is the mean of detection and fuzzing. The API key comes from an environment
variable and goes only into the Authorization header: it is never stored, printed or put in an error.
Requests are rate-limited and retried with exponential backoff (429, 5xx, connection errors; Retry-After
honoured); tokens used are counted from the responses' `usage`."""

from __future__ import annotations

import json
import os
import random
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from ..errors import SaescopeError
from .base import Explained, FeatureContexts, Scored

if TYPE_CHECKING:
    from ..config import ExplainConfig

SYSTEM = (
    "You are a meticulous AI researcher explaining a latent feature of a language model. You see text excerpts "
    "where tokens on which the feature activates are marked <<like this>>. Find what the marked tokens and "
    "their contexts have in common. Answer with one short line: the explanation only, no preamble."
)
DETECTION = (
    "A feature of a language model is explained as: {explanation}\n\nBelow are numbered text excerpts. For each, "
    "decide whether the feature would activate somewhere in it, given the explanation. Answer with a JSON list of "
    "{n} numbers, 1 for activates and 0 for not, and nothing else, e.g. {example}.\n\n{examples}"
)
FUZZING = (
    "A feature of a language model is explained as: {explanation}\n\nBelow are numbered text excerpts with some "
    "tokens marked <<like this>>. For each, decide whether the marked tokens are the ones the explanation "
    "describes. Answer with a JSON list of {n} numbers, 1 for correctly marked and 0 for not, and nothing else, "
    "e.g. {example}.\n\n{examples}"
)
RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}


@dataclass
class Usage:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    retries: int = 0

    def as_dict(self) -> dict:
        return {**self.__dict__, "total_tokens": self.prompt_tokens + self.completion_tokens}


@dataclass
class ChatClient:
    """POST {api_base}/chat/completions with retries, backoff and a rate limit."""

    api_base: str
    model: str
    api_key: str | None = None
    requests_per_minute: float = 600.0
    max_retries: int = 6
    timeout: float = 120.0
    usage: Usage = field(default_factory=Usage)
    _next_slot: float = 0.0

    def _wait_for_slot(self) -> None:
        now = time.monotonic()
        if now < self._next_slot:
            time.sleep(self._next_slot - now)
        self._next_slot = max(now, self._next_slot) + 60.0 / self.requests_per_minute

    def chat(self, messages: list[dict], max_tokens: int = 96) -> str:
        body = json.dumps({"model": self.model, "messages": messages, "max_tokens": max_tokens, "temperature": 0.0}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        url = self.api_base.rstrip("/") + "/chat/completions"
        for attempt in range(self.max_retries + 1):
            self._wait_for_slot()
            delay = min(2.0**attempt, 60.0) * (0.5 + random.random() / 2)
            try:
                with urllib.request.urlopen(urllib.request.Request(url, body, headers), timeout=self.timeout) as resp:
                    reply = json.loads(resp.read())
                break
            except urllib.error.HTTPError as exc:
                if exc.code not in RETRY_STATUS or attempt == self.max_retries:
                    raise SaescopeError(f"the LLM endpoint {url} answered HTTP {exc.code} {exc.reason}") from None
                retry_after = exc.headers.get("Retry-After") if exc.headers else None
                delay = float(retry_after) if retry_after and retry_after.replace(".", "", 1).isdigit() else delay
            except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
                if attempt == self.max_retries:
                    reason = getattr(exc, "reason", exc)
                    raise SaescopeError(f"cannot reach the LLM endpoint {url}: {reason}") from None
            self.usage.retries += 1
            time.sleep(delay)
        self.usage.requests += 1
        used = reply.get("usage") or {}
        self.usage.prompt_tokens += int(used.get("prompt_tokens") or 0)
        self.usage.completion_tokens += int(used.get("completion_tokens") or 0)
        try:
            return str(reply["choices"][0]["message"]["content"] or "")
        except (KeyError, IndexError, TypeError):
            raise SaescopeError(f"the LLM endpoint {url} answered without choices[0].message.content") from None


def render(tokens: np.ndarray, marked: np.ndarray, vocab: list[str]) -> str:
    """One excerpt as text, the marked tokens as <<token>> (consecutive marked tokens share one pair)."""
    out, open_ = [], False
    for t, m in zip(tokens.tolist(), marked.tolist()):
        if t < 0:
            continue
        if m and not open_:
            out.append("<<")
        elif not m and open_:
            out.append(">>")
        open_ = bool(m)
        out.append(vocab[t] if 0 <= t < len(vocab) else "")
    if open_:
        out.append(">>")
    return "".join(out).replace("\n", "\\n")


def parse_labels(reply: str, n: int) -> list[int] | None:
    """The first JSON-style list of n 0/1 numbers in a reply, else None."""
    for found in re.findall(r"\[[^\[\]]*\]", reply):
        try:
            values = json.loads(found)
        except ValueError:
            continue
        if isinstance(values, list) and len(values) == n and all(v in (0, 1) for v in values):
            return [int(v) for v in values]
    return None


def one_line(reply: str) -> str:
    lines = [ln.strip() for ln in reply.strip().splitlines() if ln.strip()]
    line = re.sub(r"^(explanation|answer)\s*:\s*", "", lines[0] if lines else "", flags=re.I)
    return line.strip().strip('"').strip()[:300]


def balanced_accuracy(labels: list[int], truth: list[int]) -> tuple[float | None, float | None, float | None]:
    """(balanced accuracy, precision, recall) of predicted labels against the truth."""
    t, p = np.array(truth, dtype=bool), np.array(labels, dtype=bool)
    tp, fp, fn, tn = int((p & t).sum()), int((p & ~t).sum()), int((~p & t).sum()), int((~p & ~t).sum())
    tpr = tp / (tp + fn) if tp + fn else None
    tnr = tn / (tn + fp) if tn + fp else None
    bal = (tpr + tnr) / 2 if tpr is not None and tnr is not None else None
    return bal, (tp / (tp + fp) if tp + fp else None), tpr


class LLMExplainer:
    method = "llm"

    def __init__(self, client: ChatClient, vocab: list[str], n_examples: int = 10, fire_fraction: float = 0.5, seed: int = 0):
        self.client, self.vocab, self.n_examples, self.fire_fraction = client, vocab, n_examples, fire_fraction
        self.rng = np.random.default_rng(seed)
        self._usage_before: dict = {}
        self.negatives: list[tuple[int, np.ndarray]] = []  # (feature, tokens) of other features' contexts, for detection

    @property
    def usage(self) -> dict:
        return self.client.usage.as_dict()

    @classmethod
    def from_config(cls, cfg: ExplainConfig, vocab: list[str], seed: int = 0) -> LLMExplainer:
        if not cfg.api_base or not cfg.model:
            raise SaescopeError("--method llm needs --api-base URL (an OpenAI-compatible API) and --model NAME")
        client = ChatClient(cfg.api_base, cfg.model, os.environ.get(cfg.api_key_env) or None, cfg.requests_per_minute)
        return cls(client, vocab, cfg.llm_examples, cfg.fire_fraction, seed)

    def prepare(self, batch: list[FeatureContexts]) -> None:
        """Non-activating candidates for detection: the top contexts of the batch's features."""
        self.negatives = [(f.index, f.tokens[i]) for f in batch for i in range(len(f.kinds)) if f.kinds[i] == "top"]

    def _fires(self, f: FeatureContexts) -> np.ndarray:
        return f.acts > self.fire_fraction * f.max_act

    def _pick(self, rows: np.ndarray, n: int) -> np.ndarray:
        return rows if len(rows) <= n else np.sort(self.rng.choice(rows, size=n, replace=False))

    def explain(self, feature: FeatureContexts, build: np.ndarray) -> Explained:
        self._usage_before = self.client.usage.as_dict()  # this feature's tokens: explanation and both scorers
        fires = self._fires(feature)
        rows = np.flatnonzero(build & fires.any(axis=1))
        top = [r for r in rows if feature.kinds[r] == "top"]
        interval = [r for r in rows if feature.kinds[r] != "top"]
        n_top = min(len(top), max(1, self.n_examples * 2 // 3))
        chosen = top[:n_top] + list(self._pick(np.array(interval, dtype=np.int64), self.n_examples - n_top))
        examples = "\n".join(f"{i + 1}. {render(feature.tokens[r], fires[r], self.vocab)}" for i, r in enumerate(chosen))
        reply = self.client.chat(
            [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"Excerpts:\n{examples}\n\nExplanation:"}]
        )
        return Explained(text=one_line(reply) or "(no explanation)", patterns=[])

    def _ask(self, template: str, explanation: str, excerpts: list[str]) -> list[int] | None:
        n = len(excerpts)
        listing = "\n".join(f"{i + 1}. {e}" for i, e in enumerate(excerpts))
        example = json.dumps([i % 2 for i in range(n)])
        prompt = template.format(explanation=explanation, n=n, example=example, examples=listing)
        return parse_labels(self.client.chat([{"role": "user", "content": prompt}], max_tokens=8 + 4 * n), n)

    def score(self, feature: FeatureContexts, explained: Explained, held_out: np.ndarray) -> Scored:
        fires = self._fires(feature)
        positives = self._pick(np.flatnonzero(held_out & fires.any(axis=1)), max(1, self.n_examples // 2))
        others = [t for i, t in self.negatives if i != feature.index]
        picked = [others[j] for j in self.rng.choice(len(others), size=min(len(positives), len(others)), replace=False)] if others else []
        items = [(render(feature.tokens[r], np.zeros_like(fires[r]), self.vocab), 1) for r in positives]
        items += [(render(t, np.zeros(len(t), dtype=bool), self.vocab), 0) for t in picked]
        order = self.rng.permutation(len(items))
        detection_truth = [items[i][1] for i in order]
        labels = self._ask(DETECTION, explained.text, [items[i][0] for i in order]) if items else None
        detection, precision, recall = balanced_accuracy(labels, detection_truth) if labels else (None, None, None)

        fuzz_items = []
        for j, r in enumerate(positives):  # half marked where it fires, half at as many random other positions
            marked = fires[r].copy()
            if j % 2:
                candidates = np.flatnonzero(~fires[r] & (feature.tokens[r] >= 0))
                marked[:] = False
                marked[self.rng.choice(candidates, size=min(max(int(fires[r].sum()), 1), len(candidates)), replace=False)] = True
            fuzz_items.append((render(feature.tokens[r], marked, self.vocab), 1 - j % 2))
        fuzz_labels = self._ask(FUZZING, explained.text, [e for e, _ in fuzz_items]) if len(fuzz_items) >= 2 else None
        fuzzing = balanced_accuracy(fuzz_labels, [t for _, t in fuzz_items])[0] if fuzz_labels else None
        known = [s for s in (detection, fuzzing) if s is not None]
        return Scored(
            precision,
            recall,
            sum(known) / len(known) if known else None,
            {
                "detection": detection,
                "fuzzing": fuzzing,
                "detection_items": len(items),
                "fuzzing_items": len(fuzz_items),
                "usage": {k: v - self._usage_before.get(k, 0) for k, v in self.client.usage.as_dict().items()},
            },
        )
