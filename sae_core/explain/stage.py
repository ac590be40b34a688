"""`saescope explain`: store in, store out. Explains every fired feature of an SAE's live mining run with
one method, scores each explanation on held-out contexts, embeds it for semantic search and writes it to
the `explanations` table in committed batches, so a killed run resumes where it stopped; features that
already hold an explanation of the method are skipped unless --force. The SAE-level means (the N2G
explainability metric of Gao et al. 2024 §4.4) go into the SAE's metrics."""

from __future__ import annotations

import os
import re
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator

from sqlalchemy import Connection, delete, func, insert, select, update
from sqlalchemy.engine import Engine
from tqdm import tqdm

from ..config import ExplainConfig
from ..errors import SaescopeError
from ..store import db
from ..store.changes import mark_changed
from ..store.schema import SAE, Explanation, Feature, TokenFeature, Vocab
from .base import Explained, Explainer, FeatureContexts, Scored, Scorer
from .contexts import read_contexts
from .n2g import N2GExplainer, N2GSettings

if TYPE_CHECKING:
    from .embed import Embedder

METHODS = ("n2g", "llm")
NO_PATTERN = "(no pattern)"  # N2G found no suffix that predicts any of the feature's build activations
BATCH_FEATURES = {"n2g": 256, "llm": 4}  # features per committed batch: an LLM batch costs minutes, N2G's a second


@dataclass
class ExplainResult:
    sae_name: str
    run_id: int
    method: str
    explained: int  # features explained by this call
    skipped: int  # already explained (resumed)
    seconds: float
    metrics: dict = field(default_factory=dict)  # what went into saes.metrics
    usage: dict = field(default_factory=dict)  # LLM: requests and tokens
    timings: dict = field(default_factory=dict)  # seconds reading, explaining, embedding, writing


def visible(token: str) -> str:
    """A token as one line of plain text: whitespace made visible, as the pages show it."""
    return token.replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")


def render_patterns(patterns: list[dict], vocab: list[str]) -> str:
    """N2G patterns as one line: tokens concatenated, a wildcard as ' *', patterns separated by ' | '."""

    def text(t: int | None) -> str:
        return " *" if t is None else visible(vocab[t] if 0 <= t < len(vocab) else f"<{t}>")

    return " | ".join("".join(text(t) for t in q["tokens"]).strip() for q in patterns)


def search_text(text: str, token_lists: list[list[int | None]], peak_tokens: list[str], vocab: list[str]) -> str:
    """What full-text and semantic search read: the explanation, plus each distinct word of its patterns
    and of the tokens its top contexts peak on (so 'whale' finds a feature explained by ' whales')."""
    words: list[str] = []
    for tokens in token_lists:
        words += [vocab[t].strip() for t in tokens if t is not None and 0 <= t < len(vocab)]
    words += [t.strip() for t in peak_tokens]
    seen = dict.fromkeys(w for w in words if w)
    return " ".join([text, *[w for w in seen if w not in text]]).strip()


def embedding_text(method: str, text: str, search: str, max_words: int = 24) -> str:
    """What gets embedded: an LLM's sentence as it is; for token patterns the distinct words of the search
    text (separators and repeats only lengthen the input, and the encoder's cost grows with it)."""
    if method == "llm":
        return text
    distinct = dict.fromkeys(w.lower() for w in re.findall(r"\w+", search))
    return " ".join(list(distinct)[:max_words]) or text


def read_vocab(conn: Connection, model_id: int) -> list[str]:
    """The model's token texts by token id, as mining stored them."""
    rows = conn.execute(select(Vocab.token_id, Vocab.text).where(Vocab.model_id == model_id).order_by(Vocab.token_id)).all()
    texts = [""] * (rows[-1][0] + 1 if rows else 0)
    for tid, txt in rows:
        texts[tid] = txt
    return texts


def _peaks(conn: Connection, run_id: int, indices: list[int], vocab: list[str], n: int = 5) -> dict[int, list[str]]:
    rows = conn.execute(
        select(TokenFeature.feature_index, TokenFeature.token_id)
        .where(TokenFeature.run_id == run_id, TokenFeature.feature_index.in_(indices))
        .order_by(TokenFeature.feature_index, TokenFeature.n_examples.desc(), TokenFeature.max_act.desc())
    ).all()
    out: dict[int, list[str]] = {}
    for index, token_id in rows:
        if len(out.setdefault(index, [])) < n and 0 <= token_id < len(vocab):
            out[index].append(vocab[token_id])
    return out


def make_method(cfg: ExplainConfig, vocab: list[str]) -> tuple[Explainer, Scorer]:
    if cfg.method == "n2g":
        n2g = N2GExplainer(N2GSettings(cfg.fire_fraction, cfg.max_pattern_len, cfg.min_precision, cfg.max_patterns))
        return n2g, n2g
    if cfg.method == "llm":
        from .llm import LLMExplainer

        llm = LLMExplainer.from_config(cfg, vocab)
        return llm, llm
    raise SaescopeError(f"unknown explanation method {cfg.method!r}: use one of {', '.join(METHODS)}")


def explain_one(explainer: Explainer, scorer: Scorer, feature: FeatureContexts) -> tuple[Explained, Scored]:
    build, held_out = feature.split()
    explained = explainer.explain(feature, build)
    return explained, scorer.score(feature, explained, held_out)


def aggregate(engine: Engine, run_id: int, method: str) -> dict:
    """Mean held-out precision and recall over the run's explained features (precision over those whose
    explanation predicts some held-out position, recall over those with held-out activations)."""
    with engine.connect() as conn:
        n, precision, n_precision, recall, n_recall, score = conn.execute(
            select(
                func.count(),
                func.avg(Explanation.precision),
                func.count(Explanation.precision),
                func.avg(Explanation.recall),
                func.count(Explanation.recall),
                func.avg(Explanation.score),
            ).where(Explanation.run_id == run_id, Explanation.method == method)
        ).one()
    key = "n2g" if method == "n2g" else method
    return {
        f"{key}_precision": precision,
        f"{key}_recall": recall,
        f"{key}_score": score,
        f"{key}_features": n,
        f"{key}_features_with_precision": n_precision,
        f"{key}_features_with_recall": n_recall,
    }


def _explain_batch(
    method: str, explainer: Explainer, scorer: Scorer, contexts: list[FeatureContexts], peaks: dict, vocab: list[str], run_id: int
) -> list[dict]:
    """The explanation rows of one batch of features, embeddings still to come."""
    explainer.prepare(contexts)
    rows = []
    for feature in contexts:
        explained, scored = explain_one(explainer, scorer, feature)
        text = explained.text or render_patterns(explained.patterns, vocab) or NO_PATTERN
        rows.append(
            dict(
                run_id=run_id,
                feature_index=feature.index,
                method=method,
                text=text,
                patterns=explained.patterns,
                precision=scored.precision,
                recall=scored.recall,
                score=scored.score,
                scores={**scored.scores, **({"usage": explained.usage} if explained.usage else {})},
                search_text=search_text(text, [q["tokens"] for q in explained.patterns], peaks.get(feature.index, []), vocab),
                embedding=None,
            )
        )
    return rows


def explain(sae_name: str, cfg: ExplainConfig, progress: bool = True) -> ExplainResult:
    t0 = time.perf_counter()
    if cfg.method not in METHODS:
        raise SaescopeError(f"unknown explanation method {cfg.method!r}: use one of {', '.join(METHODS)}")
    engine = db.open_store(cfg.db)
    with engine.connect() as conn:
        row = conn.execute(select(SAE.id, SAE.active_run_id, SAE.model_id, SAE.metrics).where(SAE.name == sae_name)).first()
        if row is None:
            names = conn.scalars(select(SAE.name).order_by(SAE.name)).all()
            raise SaescopeError(f"the store has no SAE named {sae_name!r}" + (f"; it has {', '.join(names)}" if names else ""))
        sae_id, run_id, model_id, _ = row
        if run_id is None:
            raise SaescopeError(f"{sae_name} has not been mined yet: run `saescope mine` first")
        vocab = read_vocab(conn, model_id)
    if cfg.force:
        with engine.begin() as conn:
            conn.execute(delete(Explanation).where(Explanation.run_id == run_id, Explanation.method == cfg.method))
            mark_changed(conn, sae_id)
    with engine.connect() as conn:
        fired = conn.scalars(select(Feature.index).where(Feature.run_id == run_id, Feature.n_fired > 0).order_by(Feature.index)).all()
        if cfg.features is not None:
            fired = fired[: cfg.features]
        done = set(conn.scalars(select(Explanation.feature_index).where(Explanation.run_id == run_id, Explanation.method == cfg.method)))
    todo = [i for i in fired if i not in done]
    explainer, scorer = make_method(cfg, vocab)
    batch_size = cfg.batch_features or BATCH_FEATURES[cfg.method]
    embed = None
    if cfg.embed:
        from .embed import embedder

        embed = embedder()
    with _torch_threads(max(1, (os.cpu_count() or 1) - 1)):  # one core stays with the explainer
        timings = _run(cfg, engine, sae_id, run_id, todo, explainer, scorer, embed, vocab, batch_size, progress)
    metrics = aggregate(engine, run_id, cfg.method)
    with engine.begin() as conn:
        current = conn.scalar(select(SAE.metrics).where(SAE.id == sae_id)) or {}
        conn.execute(update(SAE).where(SAE.id == sae_id).values(metrics={**current, **metrics}))
        mark_changed(conn, sae_id)
    usage = getattr(explainer, "usage", None)
    return ExplainResult(
        sae_name,
        run_id,
        cfg.method,
        len(todo),
        len(done),
        time.perf_counter() - t0,
        metrics,
        dict(usage) if isinstance(usage, dict) else {},
        timings,
    )


@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _run(
    cfg: ExplainConfig,
    engine: Engine,
    sae_id: int,
    run_id: int,
    todo: list[int],
    explainer: Explainer,
    scorer: Scorer,
    embed: Embedder | None,
    vocab: list[str],
    batch_size: int,
    progress: bool,
) -> dict:
    """Explain, embed and write `todo` in batches; returns the seconds spent in each part."""
    timings = dict.fromkeys(("read", "explain", "embed", "write"), 0.0)
    bar = tqdm(total=len(todo), desc=f"explaining ({cfg.method})", unit="feature", disable=not progress, dynamic_ncols=True)

    def embed_and_write(rows: list[dict], n_features: int) -> None:
        t = time.perf_counter()
        if embed is not None and rows:
            from .embed import pack

            texts = [embedding_text(cfg.method, r["text"], r["search_text"]) for r in rows]
            for r, blob in zip(rows, pack(embed.encode(texts))):
                r["embedding"] = blob
        timings["embed"] += time.perf_counter() - t
        t = time.perf_counter()
        with engine.begin() as conn:  # one batch, one transaction: a kill loses at most the batches in flight
            if rows:
                conn.execute(insert(Explanation), rows)
            mark_changed(conn, sae_id)
        timings["write"] += time.perf_counter() - t
        bar.update(n_features)

    # Two stages in step: while one thread embeds and writes batch i (torch's kernels release the GIL),
    # this one explains batch i + 1; batches are written in order, at most one waits.
    with ThreadPoolExecutor(max_workers=1) as writer:
        pending: Future | None = None
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            t = time.perf_counter()
            with engine.connect() as conn:
                contexts = read_contexts(conn, run_id, batch)
                peaks = _peaks(conn, run_id, batch, vocab)
            timings["read"] += time.perf_counter() - t
            t = time.perf_counter()
            rows = _explain_batch(cfg.method, explainer, scorer, contexts, peaks, vocab, run_id)
            timings["explain"] += time.perf_counter() - t
            if pending is not None:
                pending.result()
            pending = writer.submit(embed_and_write, rows, len(batch))
        if pending is not None:
            pending.result()
    bar.close()
    return timings
