"""Attribution graphs built on request (issue 29 items 2 and 4), by the model process, never in a page handler:

    POST /api/v1/trace           build a prompt's graph (or find it stored): its slug, URL, counts and scores
    POST /api/v1/trace/stream    the same as server-sent events: `progress` (attribution targets), then `done`
    POST /graphs/build/stream    the /graphs page's form, streamed (refusals as one `error` event)

A verb, as /api/v1/steer and /api/v1/sweep (and `saescope trace`): under /api/v1/graphs a POST would share its paths
with the reads (GET /api/v1/graphs, /api/v1/graphs/{slug}), and a 405's Allow could not name both routes' methods.

The request is checked here first: its fields by the schema (thresholds in (0, 1], caps on the numbers: 422 with
the field and the reason), its transcoder set against those the store knows (404 naming the known ones: a request
never points the server at a folder of its choosing). The model process then tokenizes the prompt (over
TraceConfig.max_prompt_tokens: 422 with the count), builds the graph with sae_core/circuits/trace.py under
LiveConfig.graph_time_limit (past it: 422 saying so) and stores it (sae_core/live/graphs.py). These are POST routes of
app.live, so the model routes' limits (app/accounts/middleware.py: sign-in, per-minute caps) apply to them.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Form, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, Field, ValidationError

from sae_core.circuits.trace import TraceConfig
from sae_core.live.graphs import GraphRequest

from ..deps import read_connection
from ..graphs import Verification, known_transcoder_set
from ..render import templates
from ..schemas import Problem
from . import gateway
from .pages import _refused, _streamed
from .schemas import LIVE_ERRORS, NO_NUL, STREAM_RESPONSE

MAX_PROMPT_CHARS = 2000  # before tokenizing; the cap that counts is TraceConfig.max_prompt_tokens, checked in tokens
MAX_FEATURE_NODES = 16_384  # the build's cost grows with them; the time limit bounds it anyway
GRAPH_ERRORS: dict[int | str, dict[str, Any]] = {
    **LIVE_ERRORS,
    404: {"model": Problem, "description": "No such transcoder set in this store (the known ones are named)"},
}
router = APIRouter()


class GraphBuildRequest(BaseModel):
    """A graph to build: `saescope trace`'s settings and defaults (the same request gives the CLI's permalink)."""

    prompt: str = Field(
        min_length=1,
        max_length=MAX_PROMPT_CHARS,
        pattern=NO_NUL,
        description=f"the prompt whose next-token prediction the graph explains; at most {TraceConfig.max_prompt_tokens} tokens",
    )
    transcoders: str = Field(
        min_length=1, max_length=4096, pattern=NO_NUL, description="a transcoder set's folder, as GET /api/v1/transcoder-sets lists it"
    )
    node_threshold: float = Field(
        GraphRequest.node_threshold, gt=0, le=1, description="keep the nodes carrying this share of the influence on the logits"
    )
    edge_threshold: float = Field(
        GraphRequest.edge_threshold, gt=0, le=1, description="keep the edges carrying this share of the edge scores"
    )
    max_n_logits: int = Field(GraphRequest.max_n_logits, ge=1, le=50, description="at most this many top output tokens as targets ...")
    desired_logit_prob: float = Field(
        GraphRequest.desired_logit_prob, gt=0, le=1, description="... fewer once their probabilities add up to this"
    )
    max_feature_nodes: int = Field(
        GraphRequest.max_feature_nodes, ge=1, le=MAX_FEATURE_NODES, description="feature nodes chosen by influence during attribution"
    )
    verify_edges: int = Field(
        GraphRequest.verify_edges, ge=0, le=100, description="check this many of the strongest kept edges by ablation in the real model"
    )


class GraphBuilt(BaseModel):
    slug: str = Field(description="the graph's permalink slug")
    url: str = Field(description="its page; GET /api/v1/graphs/{slug} is its JSON")
    reused: bool = Field(description="the permalink was stored already: nothing was built")
    prompt: str
    model: str
    n_tokens: int
    nodes_before: int
    edges_before: int
    nodes_after: int = Field(description="nodes kept by pruning")
    edges_after: int = Field(description="edges kept by pruning")
    replacement_score: float = Field(description="of the unpruned graph (Ameisen et al. 2025)")
    completeness_score: float
    pruned_scores: dict = Field(description="replacement and completeness of the pruned graph")
    seconds: float = Field(description="wall time of the build (of the stored build when reused)")
    verification: Verification | None = Field(None, description="the graph checked by ablation in the real model; None if not checked")


async def _payload(request: Request, body: GraphBuildRequest) -> dict:
    """The model process's request, once the transcoder set is one the store knows (NotFound otherwise)."""
    await read_connection(request, known_transcoder_set, body.transcoders)
    return body.model_dump()


@router.post(
    "/api/v1/trace", response_model=GraphBuilt, tags=["live"], responses=GRAPH_ERRORS, summary="Build a prompt's attribution graph"
)
async def build_graph_api(request: Request, body: GraphBuildRequest) -> dict | Response:
    """Build the attribution graph of `prompt` over a transcoder set in the model process (as `saescope trace` does),
    prune, score and store it, and answer its slug and URL; a permalink already stored is answered at once."""
    payload = await _payload(request, body)
    return await gateway.or_gone(gateway.graph(request, payload))


@router.post(
    "/api/v1/trace/stream",
    response_class=StreamingResponse,
    tags=["live"],
    responses={**GRAPH_ERRORS, **STREAM_RESPONSE},
    summary="Build a prompt's attribution graph, streamed",
)
async def build_graph_stream_api(request: Request, body: GraphBuildRequest) -> Response:
    """The build as server-sent events: `progress` {stage, done, total, unit} per batch of attribution targets, then
    `done` with the non-streamed endpoint's body, or `error` {status, detail}."""
    payload = await _payload(request, body)
    return await gateway.or_gone(gateway.graph_stream(request, payload, lambda result: result))


@router.post("/graphs/build/stream", include_in_schema=False)
@_streamed
async def build_graph_page_stream(
    request: Request,
    prompt: Annotated[str, Form(max_length=MAX_PROMPT_CHARS)] = "",
    transcoders: Annotated[str, Form(max_length=4096)] = "",
    node_threshold: Annotated[str, Form(max_length=32)] = "",
    edge_threshold: Annotated[str, Form(max_length=32)] = "",
) -> Response:
    """The /graphs page's form, streamed; `done` carries the new graph's URL (the page opens it) and a fragment."""
    fields = {"prompt": prompt, "transcoders": transcoders, "node_threshold": node_threshold, "edge_threshold": edge_threshold}
    try:
        body = GraphBuildRequest.model_validate({k: v for k, v in fields.items() if v.strip() or k in ("prompt", "transcoders")})
    except ValidationError as exc:
        raise _refused(exc) from exc
    payload = await _payload(request, body)

    def finish(result: dict) -> dict:
        html = templates.get_template("_graph_built.html").render({"g": result})
        return {"url": result["url"], "slug": result["slug"], "html": html}

    return await gateway.graph_stream(request, payload, finish)
