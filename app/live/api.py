"""The live API endpoints: a text's features (activations), steering, chat and strength sweeps, as POSTs (model
answers are not store reads: no ETag, no response cache), their streams, whether the model is up (never
cached), and the stored sweeps (GET /api/v1/sweeps/{key}: the store alone, no model process needed)."""

from __future__ import annotations

from fastapi import APIRouter, FastAPI, Path, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import Field, create_model

from sae_core.config import LiveConfig
from sae_core.errors import NotFound
from sae_core.live.errors import LiveError
from sae_core.live.sweep import SweepRequest, sweep_permalink
from sae_core.store.sweeps import find_sweep

from ..deps import read_connection
from ..schemas import Problem
from . import gateway
from .schemas import (
    LIVE_ERRORS,
    STREAM_RESPONSE,
    ActivationsRequest,
    ActivationsResponse,
    ChatRequest,
    SteerRequest,
    SteerResponse,
    SweepBody,
    SweepResponse,
    limited_chat_request,
    limited_steer_request,
)

SaeName = Path(max_length=200)
router = APIRouter()  # what does not depend on this server's caps


def limited_router(limits: LiveConfig) -> APIRouter:
    """The live API endpoints, their request models carrying this server's caps (create_app knows them)."""
    api = APIRouter()
    steer_request = limited_steer_request(limits)

    @api.post("/api/v1/saes/{sae}/activations", response_model=ActivationsResponse, tags=["live"], responses=LIVE_ERRORS)
    async def activations_api(request: Request, body: ActivationsRequest, sae: str = SaeName) -> dict | Response:
        """The SAE's strongest features on each token of `text` (and one feature's activation on every token)."""
        result = await gateway.or_gone(gateway.activations(request, sae, body))
        if isinstance(result, Response):
            return result
        for tok in result["tokens"]:
            tok["features"] = [{"index": i, "activation": a} for i, a in tok["features"]]
        return result

    async def steer_api(request: Request, body: SteerRequest) -> dict | Response:
        """The default and the steered continuation of `prompt`, with the interventions applied at the SAE's hook."""
        return await gateway.or_gone(gateway.steer(request, body))

    steer_api.__annotations__ = {"request": Request, "body": steer_request}  # a class of this call: no string annotation
    api.post("/api/v1/steer", response_model=SteerResponse, tags=["live"], responses=LIVE_ERRORS)(steer_api)

    async def steer_stream_api(request: Request, body: SteerRequest) -> Response:
        """The default and the steered continuation of `prompt`, streamed as server-sent events."""
        return await gateway.or_gone(gateway.steer_stream(request, body))

    steer_stream_api.__annotations__ = {"request": Request, "body": steer_request, "return": Response}
    api.post("/api/v1/steer/stream", response_class=StreamingResponse, tags=["live"], responses={**LIVE_ERRORS, **STREAM_RESPONSE})(
        steer_stream_api
    )

    chat_request = limited_chat_request(limits)

    async def chat_api(request: Request, body: ChatRequest) -> dict | Response:
        """A chat turn through the model's chat template: the assistant's default and steered replies."""
        return await gateway.or_gone(gateway.chat(request, body))

    chat_api.__annotations__ = {"request": Request, "body": chat_request, "return": dict | Response}
    api.post("/api/v1/chat", response_model=SteerResponse, tags=["live"], responses=LIVE_ERRORS)(chat_api)

    async def chat_stream_api(request: Request, body: ChatRequest) -> Response:
        """A chat turn's default and steered replies, streamed as server-sent events."""
        return await gateway.or_gone(gateway.chat_stream(request, body))

    chat_stream_api.__annotations__ = {"request": Request, "body": chat_request, "return": Response}
    api.post("/api/v1/chat/stream", response_class=StreamingResponse, tags=["live"], responses={**LIVE_ERRORS, **STREAM_RESPONSE})(
        chat_stream_api
    )

    sweep_body = create_model(
        "SweepBody",
        __base__=SweepBody,
        max_new_tokens=(int, Field(min(32, limits.max_new_tokens_limit), ge=1, le=min(256, limits.max_new_tokens_limit))),
    )

    async def sweep_request(request: Request, body: SweepBody) -> SweepRequest:
        from sae_core.live.interventions import Intervention

        await gateway.sae_or_404(request, body.sae)  # an unknown SAE is a 404 whatever else the body says
        if body.max_new_tokens > limits.max_new_tokens_limit:
            raise LiveError(f"max_new_tokens must be at most {limits.max_new_tokens_limit} on this server")
        return SweepRequest(
            body.sae, Intervention.parse(body.intervention), tuple(body.strengths),
            tuple(body.prompts) if body.prompts else None, tuple(body.heldout) if body.heldout is not None else None,
            body.target_feature, body.target_token, body.max_new_tokens, body.max_cost_increase,
        )  # fmt: skip

    async def sweep_api(request: Request, body: SweepBody) -> dict | Response:
        """A strength sweep: per strength the lift, the KL from the unsteered model and the fluency cost, the
        suggested strength and its held-out check, and the sweep page's permalink. A finished sweep is stored
        (GET /api/v1/sweeps/{key}); the same request again is answered from the store (`stored`: true)."""
        return await gateway.or_gone(gateway.sweep(request, await sweep_request(request, body)))

    async def sweep_stream_api(request: Request, body: SweepBody) -> Response:
        """The sweep with `progress` events ({stage, done, total} generated tokens) before `done` (the whole answer)."""
        sweep = await sweep_request(request, body)
        return await gateway.or_gone(gateway.sweep_stream(request, sweep, lambda r: {**r, "permalink": sweep_permalink(sweep)}))

    sweep_api.__annotations__ = {"request": Request, "body": sweep_body, "return": dict | Response}
    api.post("/api/v1/sweep", tags=["live"], responses=LIVE_ERRORS, response_model=SweepResponse)(sweep_api)
    sweep_stream_api.__annotations__ = {"request": Request, "body": sweep_body, "return": Response}
    api.post("/api/v1/sweep/stream", response_class=StreamingResponse, tags=["live"], responses={**LIVE_ERRORS, **STREAM_RESPONSE})(
        sweep_stream_api
    )
    return api


SWEEP_NOT_STORED: dict[int | str, dict] = {404: {"model": Problem, "description": "No sweep with this key is stored"}}


@router.get("/api/v1/sweeps/{key}", tags=["live"], response_model=SweepResponse, responses=SWEEP_NOT_STORED)
async def stored_sweep_api(
    request: Request, key: str = Path(pattern="^[0-9a-f]{1,64}$", description="the sweep's key (its permalink's `key`)")
) -> dict:
    """A stored sweep (one that finished whole), from the store alone: the model does not run. After a re-mine,
    the sweep on the SAE's live run if there is one, else the newest (`run_id` says which)."""
    found = await read_connection(request, find_sweep, key)
    if found is None:
        raise NotFound(f"no sweep with key {key} is stored (a sweep is stored when it finishes whole)")
    link = sweep_permalink(SweepRequest.from_dict(found.request))
    return {**found.result, "computed_at": found.created_at.isoformat(timespec="seconds"), "stored": True, "permalink": link}


@router.get("/api/v1/live", tags=["live"])
async def live_status(request: Request) -> dict:
    """Whether the model is up, and the live limits (never cached)."""
    return await request.app.state.live.status()


def add_error_handler(app: FastAPI) -> None:
    """Live errors as statuses: 422, and 503 with Retry-After when it will pass (NotFound is create_app's 404)."""

    @app.exception_handler(LiveError)
    async def live_error(request: Request, exc: LiveError) -> JSONResponse:
        headers = {"Retry-After": str(max(1, round(exc.retry_after)))} if exc.retry_after else None
        return JSONResponse({"detail": str(exc)}, status_code=exc.status, headers=headers)
