"""`saescope trace "prompt"`: a prompt's attribution graph, built, pruned, scored and stored under a permalink.

    TraceConfig -> trace() -> TraceResult

The transcoder set is a `saescope train --transcoders all --out DIR` folder (one transcoder per layer, loaded through
the one SAE loader, interchange.load_sae); the model is the one their provenance names. The permalink slug is a short hash of the prompt,
the transcoder set's identity (a digest of every layer's weights file: retraining into the same folder is another
set), the thresholds and the attribution settings, so tracing the same thing again returns the stored graph without
loading the model (unless `force`). What is stored is the pruned graph (`stored_graph`: kept nodes and edges only) and
its strongest token-to-top-logit path (`top_path`), read by `saescope trace`, the page and the API (app/graphs.py).
After pruning, the strongest kept feature-source edges and the strongest feature node are checked by ablation in the
real model (verify.py; `verify_edges`); the figure is stored in the row's scores JSON ("verification"), no new column.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson

from ..errors import SaescopeError
from ..sae.transcoder import TranscoderSAE
from ..store import db
from ..store import graphs as store_graphs
from .attribution import AttributionConfig, Progress, attribute_with_model
from .graph import AttributionGraph
from .prune import Pruned, prune, pruned_graph
from .scores import graph_scores
from .verify import verify

if TYPE_CHECKING:
    from sqlalchemy import Engine

GRAPH_FORMAT = 1  # the stored graph's layout (stored_graph); bump when it changes


@dataclass
class TraceConfig:
    prompt: str
    transcoders: str | Path  # a `saescope train --transcoders` output folder
    db: str | None = None  # the store (None: $SAESCOPE_DATABASE_URL, else the data directory's SQLite file)
    node_threshold: float = 0.8  # keep the nodes carrying this share of the influence on the logits
    edge_threshold: float = 0.98  # ... and the edges carrying this share of the edge scores
    max_prompt_tokens: int = 64  # longer prompts are refused (Neuronpedia's cap)
    max_n_logits: int = 10  # output logits as targets, at most ...
    desired_logit_prob: float = 0.95  # ... fewer once their probabilities add up to this
    # feature nodes chosen by influence during attribution (None: every active feature); attribution's default
    max_feature_nodes: int | None = AttributionConfig.max_feature_nodes
    # position 0's features and errors attributed (AttributionConfig.attribute_position_0); off as in circuit-tracer
    attribute_position_0: bool = False
    time_limit_s: float | None = 600.0  # the build stops with an error past this
    device: str = "auto"
    force: bool = False  # build again even when the permalink is stored
    # check this many of the strongest kept feature-source edges by ablation in the real model (verify.py; 0: none).
    # Not part of the permalink: it checks the graph, it does not change it
    verify_edges: int = 20

    def __post_init__(self) -> None:
        if not self.prompt or not self.prompt.strip():
            raise SaescopeError("the prompt is empty")
        for name in ("node_threshold", "edge_threshold", "desired_logit_prob"):
            value = getattr(self, name)
            if not 0 < value <= 1:
                raise SaescopeError(f"{name.replace('_', '-')} must be in (0, 1] (got {value})")
        if self.max_prompt_tokens < 1:
            raise SaescopeError(f"max-prompt-tokens must be at least 1 (got {self.max_prompt_tokens})")
        if self.max_n_logits < 1:
            raise SaescopeError(f"max-n-logits must be at least 1 (got {self.max_n_logits})")
        if self.max_feature_nodes is not None and self.max_feature_nodes < 1:
            raise SaescopeError(f"max-feature-nodes must be at least 1 (got {self.max_feature_nodes})")
        if self.time_limit_s is not None and self.time_limit_s <= 0:
            raise SaescopeError(f"the time limit must be positive (got {self.time_limit_s})")
        if self.verify_edges < 0:
            raise SaescopeError(f"verify-edges must be 0 (no check) or more (got {self.verify_edges})")

    def identity(self) -> dict[str, Any]:
        """The settings that change the stored graph (with the prompt and the transcoder set: the slug)."""
        return {
            "node_threshold": self.node_threshold,
            "edge_threshold": self.edge_threshold,
            "max_prompt_tokens": self.max_prompt_tokens,
            "max_n_logits": self.max_n_logits,
            "desired_logit_prob": self.desired_logit_prob,
            "max_feature_nodes": self.max_feature_nodes,
            "attribute_position_0": self.attribute_position_0,
        }


@dataclass
class TraceResult:
    slug: str
    graph_id: int
    prompt: str
    model: str
    n_tokens: int
    nodes_before: int
    edges_before: int
    nodes_after: int
    edges_after: int
    replacement_score: float  # of the unpruned graph
    completeness_score: float
    pruned_scores: dict[str, float]  # the same two of the pruned graph
    seconds: float  # the build's wall time (when reused: the stored build's)
    reused: bool  # the permalink was stored already: nothing was built
    graph: dict[str, Any] = field(repr=False)  # the stored graph (stored_graph)
    layer_saes: dict[int, tuple[str, int]] = field(default_factory=dict)  # layer -> (mined SAE name, run id)
    verification: dict[str, Any] | None = None  # verify.Verification.to_json of the stored graph, if it was checked

    @property
    def url(self) -> str:
        return f"/graphs/{self.slug}"


# ---------------------------------------------------------------------- the transcoder set


@dataclass
class TranscoderSet:
    folder: Path
    model: str
    layer_folders: dict[int, Path]  # resolved
    identity: str  # sha256 over the layers and their weights files

    def load(self) -> dict[int, TranscoderSAE]:
        """Every layer's transcoder, through the one SAE loader (interchange.load_sae)."""
        from ..interchange import load_sae

        out = {}
        for layer, path in self.layer_folders.items():
            sae = load_sae(path).sae
            if not isinstance(sae, TranscoderSAE):
                raise SaescopeError(f"{self.folder}: layer {layer}'s folder holds a {sae.architecture}, not a transcoder")
            out[layer] = sae
        return out


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def transcoder_set(folder: str | Path) -> TranscoderSet:
    """A `saescope train --transcoders` folder, checked from its configs (each layer's folder holds a transcoder
    reading that layer's MLP input, all of one model), with an identity: a digest of the weights files. The weights
    load later (`TranscoderSet.load`), only when a graph is built."""
    from ..interchange import CFG, WEIGHTS, provenance
    from ..model import parse_hook_point
    from ..train_transcoders import SUMMARY, layer_folders

    folder = Path(folder)
    if not folder.is_dir():
        raise SaescopeError(f"no transcoder folder at {folder}: give the --out folder of `saescope train --transcoders all`")
    if not (folder / SUMMARY).is_file():
        raise SaescopeError(f"{folder} is not a transcoder set: it has no {SUMMARY} (made by `saescope train --transcoders all --out DIR`)")
    try:
        layers = layer_folders(folder)
    except (ValueError, KeyError, TypeError) as exc:
        raise SaescopeError(f"{folder}/{SUMMARY} is unreadable ({exc}); train the transcoders again") from exc
    models, resolved = set(), {}
    h = hashlib.sha256()
    for layer, path in sorted(layers.items()):
        if not path.is_absolute() and not path.exists():  # --out was relative to another working directory
            path = folder / path.name
        if not (path / WEIGHTS).is_file() or not (path / CFG).is_file():
            raise SaescopeError(f"{folder}: layer {layer}'s transcoder folder {path} has no {WEIGHTS} and {CFG}")
        try:
            cfg = json.loads((path / CFG).read_text())
        except ValueError as exc:
            raise SaescopeError(f"{path}/{CFG} is not JSON ({exc})") from exc
        model, hook = provenance(cfg).require(path)
        if parse_hook_point(hook) != (layer, "mlp_in"):
            raise SaescopeError(f"{folder}: layer {layer}'s folder does not hold a transcoder reading blocks.{layer}.hook_mlp_in")
        models.add(model)
        h.update(f"{layer}:{_file_digest(path / WEIGHTS)}\n".encode())
        resolved[layer] = path.resolve()
    if len(models) != 1:
        raise SaescopeError(f"{folder}: its transcoders read different models ({sorted(models)})")
    return TranscoderSet(folder.resolve(), models.pop(), resolved, h.hexdigest())


def graph_slug(prompt: str, set_identity: str, settings: dict[str, Any]) -> str:
    key = orjson.dumps({"prompt": prompt, "transcoders": set_identity, **settings}, option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(key).hexdigest()[:12]


# ---------------------------------------------------------------------- the stored graph


def _texts(tokenizer: Any, ids: list[int]) -> list[str]:
    return [t.replace("\x00", "\u2400") for t in tokenizer.batch_decode([[i] for i in ids], clean_up_tokenization_spaces=False)]


def stored_graph(graph: AttributionGraph, pruned: Pruned, prompt: str, tokenizer: Any) -> dict[str, Any]:
    """The pruned graph as plain JSON: kept nodes (renumbered 0..n-1 in the graph's node order) and kept edges
    [source, target, weight]. Embedding nodes sit at layer -1, logits at layer n_layers (on the last position)."""
    kept = np.nonzero(pruned.node_mask)[0]
    new_id = {int(old): i for i, old in enumerate(kept)}
    F, E, T = graph.n_features, graph.n_errors, graph.n_pos
    tokens = _texts(tokenizer, graph.input_ids)
    logit_texts = _texts(tokenizer, graph.logit_tokens)
    nodes: list[dict[str, Any]] = []
    for old in kept.tolist():
        influence = round(float(pruned.node_influence[old]), 6)
        if old < F:
            layer, pos, index = (int(v) for v in graph.features[old])
            node = {"kind": "feature", "layer": layer, "pos": pos, "feature": index, "activation": round(float(graph.activations[old]), 6)}
        elif old < F + E:
            layer, pos = divmod(old - F, T)
            node = {"kind": "error", "layer": layer, "pos": pos}
        elif old < F + E + T:
            pos = old - F - E
            node = {"kind": "embedding", "layer": -1, "pos": pos, "token": graph.input_ids[pos], "text": tokens[pos]}
        else:
            i = old - F - E - T
            node = {
                "kind": "logit",
                "layer": graph.n_layers,
                "pos": T - 1,
                "rank": i,
                "token": graph.logit_tokens[i],
                "text": logit_texts[i],
                "probability": round(float(graph.logit_probabilities[i]), 6),
            }
        nodes.append({"id": new_id[old], **node, "influence": influence})
    targets, sources = np.nonzero(pruned.edge_mask)
    weights = graph.adjacency[targets, sources]
    edges = [[new_id[int(s)], new_id[int(t)], float(w)] for s, t, w in zip(sources.tolist(), targets.tolist(), weights.tolist())]
    out = {
        "format": GRAPH_FORMAT,
        "prompt": prompt,
        "input_ids": list(graph.input_ids),
        "tokens": tokens,
        "n_layers": graph.n_layers,
        "nodes": nodes,
        "edges": edges,
    }
    out["top_path"] = top_path(out)
    return out


def top_path(stored: dict[str, Any]) -> list[int]:
    """The strongest chain from a token to the top logit through the stored graph: node ids, token first. A chain's
    strength is the product of its edges' shares of their targets' incoming weight (|w| normalised per target, as
    influence is); the strongest chain through at least one feature wins over direct token-to-logit paths when one
    exists. Edges only go to deeper layers, so one pass in layer order finds it."""
    nodes, edges = stored["nodes"], stored["edges"]
    logits = [n for n in nodes if n["kind"] == "logit"]
    if not logits:
        return []
    goal = min(logits, key=lambda n: n["rank"])["id"]
    incoming: dict[int, list[tuple[int, float]]] = {}
    total: dict[int, float] = {}
    for s, t, w in edges:
        incoming.setdefault(t, []).append((s, abs(w)))
        total[t] = total.get(t, 0.0) + abs(w)
    # best[state][v] = (strength, predecessor, predecessor's state); state 0: no feature on the chain yet, 1: one at least
    best: list[dict[int, tuple[float, int | None, int]]] = [{}, {}]
    for node in sorted(nodes, key=lambda n: (n["layer"], n["pos"], n["id"])):
        v = node["id"]
        if node["kind"] == "embedding":
            best[0][v] = (1.0, None, 0)
            continue
        for s, w in incoming.get(v, []):
            share = w / total[v] if total[v] > 0 else 0.0
            for have in (0, 1):
                if s not in best[have]:
                    continue
                strength = best[have][s][0] * share
                into = 1 if node["kind"] == "feature" else have
                if strength > best[into].get(v, (0.0, None, 0))[0]:
                    best[into][v] = (strength, s, have)
    state = 1 if goal in best[1] else 0
    if goal not in best[state]:
        return []
    path, v = [goal], goal
    while True:
        _, prev, prev_state = best[state][v]
        if prev is None:
            return path[::-1]
        path.append(prev)
        v, state = prev, prev_state


# ---------------------------------------------------------------------- the build


def _attribution_config(cfg: TraceConfig) -> AttributionConfig:
    return AttributionConfig(
        max_prompt_tokens=cfg.max_prompt_tokens,
        max_n_logits=cfg.max_n_logits,
        desired_logit_prob=cfg.desired_logit_prob,
        time_limit_s=cfg.time_limit_s,
        max_feature_nodes=cfg.max_feature_nodes,
        attribute_position_0=cfg.attribute_position_0,
    )


def _result(row: Any, graph: dict[str, Any], reused: bool, layer_saes: dict[int, tuple[str, int]]) -> TraceResult:
    return TraceResult(
        slug=row.slug,
        graph_id=row.id,
        prompt=row.prompt,
        model=row.model,
        n_tokens=row.n_tokens,
        nodes_before=row.nodes_before,
        edges_before=row.edges_before,
        nodes_after=row.nodes_after,
        edges_after=row.edges_after,
        replacement_score=row.replacement_score,
        completeness_score=row.completeness_score,
        pruned_scores=dict(row.scores.get("pruned", {})),
        seconds=row.seconds,
        reused=reused,
        graph=graph,
        layer_saes=layer_saes,
        verification=row.scores.get("verification"),
    )


def trace(
    cfg: TraceConfig,
    lm: Any | None = None,
    progress: Progress | None = None,
    *,
    engine: Engine | None = None,
    load_lm: Callable[[str], Any] | None = None,
) -> TraceResult:
    """Build, prune, score and store the prompt's attribution graph, or find it stored. `lm`: a loaded
    LanguageModel of the transcoders' model (else `load_lm(model name)` gives one, else it is loaded here, in
    float32); `progress(done, total)` per batch of attribution targets. `engine`: the store, open and kept open
    (the live model process's; else cfg.db is opened and closed here)."""
    from ..model import load_model

    start = time.monotonic()
    tset = transcoder_set(cfg.transcoders)
    settings = cfg.identity()
    slug = graph_slug(cfg.prompt, tset.identity, settings)
    attribution_cfg = _attribution_config(cfg)  # refuses an unsupported option before anything loads
    own_engine = engine is None
    if engine is None:
        engine = db.open_store(cfg.db, upgrade_schema=db_is_empty(cfg.db))
    try:
        folders = {str(layer): str(path) for layer, path in tset.layer_folders.items()}
        with engine.connect() as conn:
            row = store_graphs.find_graph(conn, slug)
            layer_saes = store_graphs.transcoder_saes(conn, folders)
        if row is not None and not cfg.force:
            return _result(row, store_graphs.unpack_graph(row.graph), True, layer_saes)

        if lm is None and load_lm is not None:
            lm = load_lm(tset.model)
        if lm is None:
            lm = load_model(tset.model, cfg.device, "float32")  # attribution in float32: bf16 edges would not add up
        missing = sorted(set(range(lm.n_layers)) - set(tset.layer_folders))
        if missing:
            raise SaescopeError(
                f"a graph needs a transcoder for every layer of {tset.model} (0..{lm.n_layers - 1}); {tset.folder} lacks "
                f"layers {missing}: train them with `saescope train --transcoders all`"
            )
        ids = lm.tokenizer(cfg.prompt, add_special_tokens=False)["input_ids"]  # as the live runtime tokenizes
        if not ids:
            raise SaescopeError("the prompt has no tokens")
        if len(ids) > cfg.max_prompt_tokens:
            raise SaescopeError(f"the prompt has {len(ids)} tokens; attribution graphs take at most {cfg.max_prompt_tokens}")
        dtype = lm.model.get_output_embeddings().weight.dtype
        transcoders = {layer: sae.to(lm.device, dtype).eval() for layer, sae in tset.load().items()}
        t_attr = time.monotonic()
        graph, rm = attribute_with_model(lm.model, transcoders, ids, attribution_cfg, progress)
        t_prune = time.monotonic()
        pruned = prune(graph, cfg.node_threshold, cfg.edge_threshold)
        full, kept = graph_scores(graph), graph_scores(pruned_graph(graph, pruned))
        stored = stored_graph(graph, pruned, cfg.prompt, lm.tokenizer)
        t_verify = time.monotonic()
        scores: dict[str, Any] = {"pruned": {"replacement": kept.replacement, "completeness": kept.completeness}}
        if cfg.verify_edges:
            checked = verify(lm, rm, graph, pruned, cfg.verify_edges)
            scores["verification"] = checked.to_json(np.nonzero(pruned.node_mask)[0])
        del rm
        t_end = time.monotonic()
        timings = {
            "load": t_attr - start,
            "attribution": t_prune - t_attr,
            "prune_and_score": t_verify - t_prune,
            "verify": t_end - t_verify,
        }
        scores["seconds"] = timings
        values = {
            "slug": slug,
            "prompt": cfg.prompt,
            "model": tset.model,
            "transcoders": tset.identity,
            "transcoders_path": str(tset.folder),
            "layer_folders": folders,
            "config": settings,
            "n_tokens": len(ids),
            "nodes_before": graph.n_nodes,
            "edges_before": int(np.count_nonzero(graph.adjacency)),
            "nodes_after": pruned.n_nodes,
            "edges_after": pruned.n_edges,
            "replacement_score": full.replacement,
            "completeness_score": full.completeness,
            "scores": scores,
            "seconds": t_end - start,
        }
        store_graphs.save_graph(engine, values, stored, replace=cfg.force)
        with engine.connect() as conn:
            row = store_graphs.find_graph(conn, slug)
        assert row is not None
        return _result(row, stored, False, layer_saes)
    finally:
        if own_engine:
            engine.dispose()


def db_is_empty(url: str | None) -> bool:
    """Whether the store has no schema yet (trace then creates it, as `saescope mine` does); a store at an older
    revision is left for `saescope db upgrade`."""
    engine = db.make_engine(url)
    try:
        return db.current_revision(engine) is None
    finally:
        engine.dispose()


__all__ = ["TraceConfig", "TraceResult", "graph_slug", "stored_graph", "top_path", "trace", "transcoder_set"]
