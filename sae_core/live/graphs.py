"""Attribution graphs asked of the live model process (issue 29 items 2 and 4): POST /api/v1/trace and the /graphs
page's form send a GraphRequest (op "trace", pool.py); the model process builds the graph with
sae_core/circuits/trace.py, the one attribution path `saescope trace` takes, stores it under its permalink and
answers its slug. A permalink already stored is answered from the store without running the model.

The build runs under LiveConfig.graph_time_limit (from the request's start: loading the transcoders counts) and stops
when the client goes away; both are checked after every batch of attribution targets, where the progress events
come from: {"stage": "attribution", "done", "total", "unit": "targets"}, as a sweep's count tokens.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any, Callable

from ..circuits.trace import TraceConfig
from ..errors import SaescopeError
from .errors import LiveError

if TYPE_CHECKING:
    from .runtime import LiveRuntime

STAGE = "attribution"


@dataclass(frozen=True)
class GraphRequest:
    """A graph to build: the prompt, the transcoder set's folder (one the store knows: the web app checks) and the
    settings `saescope trace` takes, with its defaults (so the page, the API and the CLI share permalinks)."""

    prompt: str
    transcoders: str
    node_threshold: float = TraceConfig.node_threshold
    edge_threshold: float = TraceConfig.edge_threshold
    max_n_logits: int = TraceConfig.max_n_logits
    desired_logit_prob: float = TraceConfig.desired_logit_prob
    max_feature_nodes: int = 1024  # TraceConfig's (attribution's) default; a number here, never "every feature"
    verify_edges: int = TraceConfig.verify_edges

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> GraphRequest:
        known = {f.name for f in fields(cls)}
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"unknown fields {sorted(unknown)}")
        return cls(**raw)

    def trace_config(self, time_limit_s: float, device: str) -> TraceConfig:
        """trace's config (SaescopeError for a value out of range, with the reason)."""
        return TraceConfig(**asdict(self), time_limit_s=time_limit_s, device=device)


def build_graph(
    runtime: LiveRuntime,
    request: GraphRequest,
    time_limit_s: float,
    emit: Callable[[dict[str, Any]], None] = lambda progress: None,
    cancelled: Callable[[], bool] = lambda: False,
) -> dict[str, Any]:
    """Build (or find) and store the request's graph; its summary (slug, url, counts, scores; the graph itself is
    read from the store: GET /api/v1/graphs/{slug}). LiveError (422) for bad input or a build past the time limit."""
    start = time.monotonic()

    def progress(done: int, total: int) -> None:
        if cancelled():
            raise LiveError("cancelled: the client went away")
        if time.monotonic() - start > time_limit_s:
            raise LiveError(
                f"the graph build ran past its time limit of {time_limit_s:g} s (graph_time_limit) after {done} of {total} "
                "attribution targets; use a shorter prompt or fewer feature nodes, or ask for a longer limit"
            )
        emit({"stage": STAGE, "done": done, "total": total, "unit": "targets"})

    try:
        cfg = request.trace_config(time_limit_s, runtime.cfg.live_device)
    except SaescopeError as exc:
        raise LiveError(str(exc)) from exc
    result = runtime.trace(cfg, progress)
    return {
        "slug": result.slug,
        "url": result.url,
        "reused": result.reused,
        "prompt": result.prompt,
        "model": result.model,
        "n_tokens": result.n_tokens,
        "nodes_before": result.nodes_before,
        "edges_before": result.edges_before,
        "nodes_after": result.nodes_after,
        "edges_after": result.edges_after,
        "replacement_score": result.replacement_score,
        "completeness_score": result.completeness_score,
        "pruned_scores": result.pruned_scores,
        "seconds": result.seconds,
        "verification": result.verification,
    }


__all__ = ["GraphRequest", "build_graph"]
