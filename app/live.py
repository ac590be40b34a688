"""The live pages and endpoints: features on the user's own text, and steering (sae_core/live).

The model runs in the server's one model process (sae_core/live/pool.py); these handlers only check
the request against the store (unknown SAE or feature: 404), hand it over, and render the answer, so
a generation never holds a page worker. Model answers are POSTs: they are not store reads and get no
ETag or response cache. The GET pages (`/saes/{sae}/inference`, `/saes/{sae}/steer?...`) render the
form from the store alone; their results come from a POST fragment that htmx requests on load, so a
steering permalink (prompt, interventions, seed and settings in its query) reproduces its result
whenever it is opened. Whether the model is up is a fragment of its own (/live/status), never cached.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass
from typing import Annotated, Any, AsyncIterator

from fastapi import APIRouter, FastAPI, Form, Path, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field, create_model
from sqlalchemy import Connection, select

from sae_core.config import GenerationConfig, LiveConfig
from sae_core.live.errors import LiveError, Loading, Unavailable
from sae_core.live.interventions import MODES, Intervention, Mode, steer_permalink
from sae_core.live.pool import ClientGone, LiveClient, ModelPool
from sae_core.store.schema import SAE, Feature

from . import queries
from .deps import read_connection
from .render import heat, templates
from .schemas import Problem

ENV_LIVE = "SAESCOPE_LIVE"  # set by `saescope serve` for its workers: {"socket": ..., "limits": {...}} or {"off": reason}
OFF_HERE = "the live features run under `saescope serve` (this app was built without them)"
router = APIRouter()
SaeName = Path(max_length=200)
MAX_TEXT_CHARS = 20_000  # before tokenizing; past LiveConfig's token caps a text is cut (the answer says by how much)
MAX_INDEX = 2**31 - 1  # a feature index, as the store keeps it
DETERMINISM = "deterministic for a given seed, model dtype and machine kind"


# ---------------------------------------------------------------------- where the model is


@dataclass
class Gateway:
    """app.state.live: the client of the model process, or why there is none."""

    limits: LiveConfig
    client: LiveClient | None = None
    off: str | None = None
    own_pool: ModelPool | None = None  # started by this app (no `saescope serve` around it)

    @classmethod
    def configure(cls, db_url: str, live: LiveConfig | None) -> Gateway:
        """From create_app's `live` (this app starts its own model process) or from `saescope serve`'s environment."""
        if live is not None:
            return cls(live, own_pool=ModelPool(db_url, live))
        env = os.environ.get(ENV_LIVE)
        if not env:
            return cls(LiveConfig(), off=OFF_HERE)
        spec = json.loads(env)
        limits = LiveConfig(**spec.get("limits", {}))
        if spec.get("off"):
            return cls(limits, off=spec["off"])
        return cls(limits, client=LiveClient(spec["socket"]))

    def start(self) -> None:
        if self.own_pool is not None:
            self.client = LiveClient(self.own_pool.start().socket)

    def stop(self) -> None:
        if self.own_pool is not None:
            self.own_pool.stop()

    async def call(self, request: Request, payload: dict) -> dict:
        if self.client is None:
            raise Unavailable(f"live features are off: {self.off}")
        return await self.client.call(payload, request.is_disconnected)


def serve_env(socket: str | None, limits: LiveConfig, off: str | None = None) -> str:
    """The ENV_LIVE value `saescope serve` gives its workers."""
    return json.dumps({"socket": socket, "limits": asdict(limits), "off": off})


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    app.state.live.start()
    try:
        yield
    finally:
        app.state.live.stop()


def install(app: FastAPI, db_url: str, live: LiveConfig | None) -> None:
    """Attach the gateway, the API endpoints with this server's caps, and map live errors to statuses
    (503 with Retry-After when it will pass)."""
    app.state.live = Gateway.configure(db_url, live)
    app.include_router(api_router(app.state.live.limits))

    @app.exception_handler(LiveError)
    async def live_error(request: Request, exc: LiveError):
        headers = {"Retry-After": str(max(1, round(exc.retry_after)))} if exc.retry_after else None
        return JSONResponse({"detail": str(exc)}, status_code=exc.status, headers=headers)


# ---------------------------------------------------------------------- API models


class ActivationsRequest(BaseModel):
    text: str = Field(
        min_length=1, max_length=MAX_TEXT_CHARS, description="the text to read; past the server's max_text_tokens its beginning is read"
    )
    feature: int | None = Field(None, ge=0, le=MAX_INDEX, description="also return this feature's activation on every token")
    top: int = Field(8, ge=1, le=64, description="strongest features listed per token")


class FeatureActivation(BaseModel):
    index: int
    activation: float


class TokenActivations(BaseModel):
    id: int
    text: str
    features: list[FeatureActivation] = Field(description="strongest first; empty on skipped positions")
    skipped: bool = Field(description="a leading position the SAE was not trained on (the attention sink)")


class ActivationsResponse(BaseModel):
    sae: str
    run_id: int = Field(description="the mining run whose SAE weights answered")
    tokens: list[TokenActivations]
    feature: int | None
    feature_acts: list[float] | None
    truncated: int = Field(0, description="tokens past the server's max_text_tokens, left out (0: the whole text was read)")


class InterventionModel(BaseModel):
    feature: int = Field(ge=0, le=MAX_INDEX)
    mode: Mode = Field(description="clamp: set the latent to value; add: add value x the decoder direction; scale: multiply it")
    value: float = Field(gt=-1e6, lt=1e6)


class SteerRequest(BaseModel):
    """What the steering page's form gives; the API's model is `limited_steer_request`'s, with this server's caps."""

    sae: str = Field(max_length=200)
    prompt: str = Field(min_length=1, max_length=MAX_TEXT_CHARS, description="past the server's max_prompt_tokens its end is continued")
    interventions: list[InterventionModel] = Field(
        default_factory=list, max_length=64, description="applied in order; several on one feature compose"
    )
    max_new_tokens: int = Field(32, ge=1, le=4096)
    temperature: float = Field(0.0, ge=0, le=10, description="0: greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int = Field(0, ge=0, le=2**32 - 1)

    def settings(self) -> GenerationConfig:
        return GenerationConfig(self.max_new_tokens, self.temperature, self.top_p, self.seed)


class ContinuationModel(BaseModel):
    token_ids: list[int]
    tokens: list[str]
    text: str
    stopped: str = Field(description="eos, length, time_limit or cancelled")


class SteerResponse(BaseModel):
    sae: str
    run_id: int
    prompt_tokens: list[str]
    default: ContinuationModel
    steered: ContinuationModel
    diverges_at: int | None = Field(description="first generated position where the continuations differ")
    prompt_truncated: int = Field(
        0, description="tokens cut from the prompt's start (past max_prompt_tokens): prompt_tokens were continued"
    )
    permalink: str = Field(description=f"the steering page of this request: {DETERMINISM}")


def limited_steer_request(limits: LiveConfig) -> type[SteerRequest]:
    """SteerRequest with this server's caps in its schema (maximum, maxItems), so that the OpenAPI document
    states them and every request it admits is answered."""
    default = min(GenerationConfig().max_new_tokens, limits.max_new_tokens_limit)
    interventions: Any = Field(
        default_factory=list, max_length=limits.max_interventions, description="applied in order; several on one feature compose"
    )
    return create_model(
        "SteerRequest",
        __base__=SteerRequest,
        interventions=(list[InterventionModel], interventions),
        max_new_tokens=(int, Field(default, ge=1, le=limits.max_new_tokens_limit)),
    )


# ---------------------------------------------------------------------- the work


def _check(conn: Connection, sae: str, features: list[int]) -> dict[int, float]:
    """404 for an unknown or unmined SAE or a feature past its width; the features' max activations."""
    for index in features or [0]:
        queries.feature_ref(conn, sae, index)
    rows = conn.execute(
        select(Feature.index, Feature.max_act)
        .join(SAE, SAE.active_run_id == Feature.run_id)
        .where(SAE.name == sae, Feature.index.in_(features))
    )
    return {int(i): float(m) for i, m in rows}


async def activations(request: Request, sae: str, body: ActivationsRequest) -> dict:
    await read_connection(request, _check, sae, [] if body.feature is None else [body.feature])
    payload = {"op": "encode", "sae": sae, "text": body.text, "feature": body.feature, "top": body.top}
    return await request.app.state.live.call(request, payload)


async def steer(request: Request, body: SteerRequest) -> dict:
    await read_connection(request, _check, body.sae, [iv.feature for iv in body.interventions])
    payload = {
        "op": "generate",
        "sae": body.sae,
        "prompt": body.prompt,
        "interventions": [[iv.feature, iv.mode, iv.value] for iv in body.interventions],
        "settings": asdict(body.settings()),
    }
    result = await request.app.state.live.call(request, payload)
    interventions = [Intervention(iv.feature, iv.mode, iv.value) for iv in body.interventions]
    return {**result, "permalink": steer_permalink(body.sae, body.prompt, interventions, body.settings())}


async def _or_gone(work) -> Any:
    try:
        return await work
    except ClientGone:
        return Response(status_code=499)  # nobody reads it: the client closed the connection


# ---------------------------------------------------------------------- API


class LiveProblem(BaseModel):
    """A 422: FastAPI's list of validation errors, or the live limit the request is over, in words."""

    detail: str | list[dict[str, Any]]


RETRY_AFTER = {
    "Retry-After": {"description": "seconds after which the queue has likely drained (when busy)", "schema": {"type": "integer"}}
}
LIVE_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": Problem, "description": "The body is not JSON (FastAPI could not parse it)"},
    404: {"model": Problem, "description": "No such SAE or feature, or the SAE has not been mined yet"},
    422: {"model": LiveProblem, "description": "Invalid input: the field and the reason, or the live limit exceeded"},
    503: {
        "model": Problem,
        "description": "The model is busy (Retry-After), off (serve --no-live), loading, or could not be loaded: the reason",
        "headers": RETRY_AFTER,
    },
}


def api_router(limits: LiveConfig) -> APIRouter:
    """The live API endpoints, their request models carrying this server's caps (create_app knows them)."""
    api = APIRouter()
    steer_request = limited_steer_request(limits)

    @api.post("/api/v1/saes/{sae}/activations", response_model=ActivationsResponse, tags=["live"], responses=LIVE_ERRORS)
    async def activations_api(request: Request, body: ActivationsRequest, sae: str = SaeName):
        """The SAE's strongest features on each token of `text` (and one feature's activation on every token)."""
        result = await _or_gone(activations(request, sae, body))
        if isinstance(result, Response):
            return result
        for tok in result["tokens"]:
            tok["features"] = [{"index": i, "activation": a} for i, a in tok["features"]]
        return result

    async def steer_api(request: Request, body):
        """The default and the steered continuation of `prompt`, with the interventions applied at the SAE's hook."""
        return await _or_gone(steer(request, body))

    steer_api.__annotations__ = {"request": Request, "body": steer_request}  # a class of this call: no string annotation
    api.post("/api/v1/steer", response_model=SteerResponse, tags=["live"], responses=LIVE_ERRORS)(steer_api)
    return api


@router.get("/api/v1/live", tags=["live"])
async def live_status(request: Request) -> dict:
    """Whether the model is up, and the live limits (never cached)."""
    return await _status(request)


async def _status(request: Request) -> dict:
    gateway: Gateway = request.app.state.live
    if gateway.client is None:
        return {"state": "off", "detail": f"live features are off: {gateway.off}", "limits": asdict(gateway.limits)}
    try:
        return await gateway.client.call({"op": "status"})
    except Unavailable as exc:
        return {"state": "starting", "detail": str(exc), "limits": asdict(gateway.limits)}


# ---------------------------------------------------------------------- pages


@router.get("/live/status", include_in_schema=False)
async def status_fragment(request: Request):
    return templates.TemplateResponse(request, "_live_status.html", {"status": await _status(request)})


async def _sae_or_404(request: Request, sae: str) -> None:
    await read_connection(request, _check, sae, [])


@router.get("/saes/{sae}/inference", include_in_schema=False)
async def inference_page(request: Request, sae: str = SaeName):
    await _sae_or_404(request, sae)
    return templates.TemplateResponse(request, "inference.html", {"sae": sae, "max_chars": MAX_TEXT_CHARS})


def _error(request: Request, exc: Exception, form: str = "", vals: dict | None = None):
    """The fragment for a live result that failed. While the model loads, a card that says so and posts
    `form` again by itself after the Retry-After, replacing itself with the result."""
    if isinstance(exc, Loading):
        ctx = {"reason": str(exc), "retry": max(1, round(exc.retry_after or 2)), "form": form, "vals": json.dumps(vals or {})}
        return templates.TemplateResponse(request, "_live_loading.html", ctx)
    status = getattr(exc, "status", 422 if isinstance(exc, (LiveError, queries.NotFound)) else 500)
    if isinstance(exc, queries.NotFound):
        status = 404
    # a fragment for htmx to swap in (htmx leaves non-2xx answers unswapped): the status is in the card
    return templates.TemplateResponse(
        request, "_live_error.html", {"status": status, "reason": str(exc), "retry": getattr(exc, "retry_after", None)}
    )


@router.post("/saes/{sae}/inference/result", include_in_schema=False)
async def inference_result(
    request: Request, sae: str = SaeName, text: Annotated[str, Form(max_length=MAX_TEXT_CHARS)] = "", feature: Annotated[str, Form()] = ""
):
    try:
        chosen = int(feature) if feature.strip() else None
        body = ActivationsRequest(text=text or " ", feature=chosen, top=8) if text else None
        if body is None:
            raise LiveError("type or paste a text first")
        result = await activations(request, sae, body)
    except ClientGone:
        return Response(status_code=499)
    except (LiveError, queries.NotFound, ValueError) as exc:
        return _error(request, exc, "#inference-form", {"feature": feature})
    return templates.TemplateResponse(request, "_live_tokens.html", _tokens_view(request, sae, result))


def _tokens_view(request: Request, sae: str, result: dict) -> dict:
    tokens = result["tokens"]
    if result["feature"] is not None:
        acts = result["feature_acts"]
        top = max(acts, default=0.0)
        heats = [heat(a, top) for a in acts]
    else:
        strongest = [t["features"][0][1] if t["features"] else 0.0 for t in tokens]
        top = max(strongest, default=0.0)
        heats = [heat(a, top) for a in strongest]
    return {"sae": sae, "result": result, "heats": heats, "top": top}


@router.post("/saes/{sae}/features/{index}/try", include_in_schema=False)
async def feature_try(request: Request, sae: str = SaeName, index: int = Path(ge=0, le=2**31 - 1), text: Annotated[str, Form()] = ""):
    """The feature page's "try it on your text" box: the text highlighted by this feature (relative to its mined max)."""
    try:
        if not text.strip():
            raise LiveError("type or paste a text first")
        maxima = await read_connection(request, _check, sae, [index])
        result = await activations(request, sae, ActivationsRequest(text=text[:MAX_TEXT_CHARS], feature=index, top=1))
    except ClientGone:
        return Response(status_code=499)
    except (LiveError, queries.NotFound) as exc:
        return _error(request, exc, "#try-form")
    mined_max = maxima.get(index, 0.0)
    scale = mined_max if mined_max > 0 else max(result["feature_acts"], default=0.0)
    view = {"sae": sae, "index": index, "result": result, "heats": [heat(a, scale) for a in result["feature_acts"]], "mined_max": mined_max}
    view["strongest"] = max(result["feature_acts"], default=0.0)
    return templates.TemplateResponse(request, "_live_feature_text.html", view)


def _form_interventions(features: list[str], modes: list[str], values: list[str]) -> list[InterventionModel]:
    out = []
    for i, raw in enumerate(features):
        if not raw.strip():
            continue
        mode = modes[i] if i < len(modes) and modes[i] in MODES else "clamp"
        value = values[i] if i < len(values) and values[i].strip() else "0"
        try:
            out.append(InterventionModel(feature=int(raw), mode=mode, value=float(value)))  # type: ignore[arg-type]
        except ValueError as exc:
            raise LiveError(f"intervention {i + 1}: feature must be a whole number and value a number ({raw!r}, {value!r})") from exc
    return out


STEER_DEFAULTS = GenerationConfig()


@router.get("/saes/{sae}/steer", include_in_schema=False)
async def steer_page(
    request: Request,
    sae: str = SaeName,
    prompt: str = Query("", max_length=MAX_TEXT_CHARS),
    feature: list[str] = Query([]),
    mode: list[str] = Query([]),
    value: list[str] = Query([]),
    max_new_tokens: int = Query(STEER_DEFAULTS.max_new_tokens, ge=1, le=4096),
    temperature: float = Query(STEER_DEFAULTS.temperature, ge=0, le=10),
    top_p: float = Query(STEER_DEFAULTS.top_p, gt=0, le=1),
    seed: int = Query(STEER_DEFAULTS.seed, ge=0, le=2**32 - 1),
):
    await _sae_or_404(request, sae)
    rows = [
        {"feature": f, "mode": mode[i] if i < len(mode) else "clamp", "value": value[i] if i < len(value) else ""}
        for i, f in enumerate(feature)
        if f.strip()
    ]
    rows += [{"feature": "", "mode": "clamp", "value": ""} for _ in range(max(1, 4 - len(rows)))]
    settings = GenerationConfig(max_new_tokens, temperature, top_p, seed)
    ctx = {
        "sae": sae,
        "prompt": prompt,
        "rows": rows,
        "settings": settings,
        "modes": MODES,
        "determinism": DETERMINISM,
        "run": bool(prompt),
    }
    return templates.TemplateResponse(request, "steer.html", ctx)


@router.post("/saes/{sae}/steer/result", include_in_schema=False)
async def steer_result(
    request: Request,
    sae: str = SaeName,
    prompt: Annotated[str, Form(max_length=MAX_TEXT_CHARS)] = "",
    feature: Annotated[list[str], Form()] = [],  # noqa: B006 - FastAPI copies form defaults
    mode: Annotated[list[str], Form()] = [],  # noqa: B006
    value: Annotated[list[str], Form()] = [],  # noqa: B006
    max_new_tokens: Annotated[int, Form(ge=1, le=4096)] = STEER_DEFAULTS.max_new_tokens,
    temperature: Annotated[float, Form(ge=0, le=10)] = STEER_DEFAULTS.temperature,
    top_p: Annotated[float, Form(gt=0, le=1)] = STEER_DEFAULTS.top_p,
    seed: Annotated[int, Form(ge=0, le=2**32 - 1)] = STEER_DEFAULTS.seed,
):
    try:
        if not prompt:
            raise LiveError("write a prompt first")
        body = SteerRequest(
            sae=sae,
            prompt=prompt,
            interventions=_form_interventions(feature, mode, value),
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
        )
        result = await steer(request, body)
    except ClientGone:
        return Response(status_code=499)
    except (LiveError, queries.NotFound) as exc:
        return _error(request, exc, "#steer-form")
    diverge = result["diverges_at"]
    ctx = {
        "sae": sae,
        "result": result,
        "diverge": len(result["steered"]["tokens"]) if diverge is None else diverge,
        "determinism": DETERMINISM,
    }
    ctx["interventions"] = [Intervention(iv.feature, iv.mode, iv.value).spec() for iv in body.interventions]
    return templates.TemplateResponse(request, "_live_steer.html", ctx)
