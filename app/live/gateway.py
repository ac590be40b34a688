"""Where the model is, and what the live API and pages ask it: check the request against the store
(unknown SAE or feature: NotFound), hand it to the model process (sae_core/live/pool.py) and return
its answer. A generation never holds a page worker: the model runs in the server's one model process.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable
from urllib.parse import quote, urlencode

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from sqlalchemy import Connection, select

from sae_core.config import LiveConfig
from sae_core.errors import NotFound
from sae_core.live.errors import LiveError, Unavailable
from sae_core.live.interventions import Condition, Intervention, steer_permalink
from sae_core.live.pool import ClientGone, LiveClient, ModelPool
from sae_core.live.sweep import SweepRequest, sweep_permalink
from sae_core.store.schema import SAE, Feature

from .. import queries
from ..deps import read_connection
from .schemas import ActivationsRequest, ChatRequest, SteerRequest, SteerResponse

OFF_HERE = "the live features run under `saescope serve` (this app was built without them)"


@dataclass(frozen=True)
class LiveLink:
    """Where an app's live features come from (part of app.config.AppConfig): the model process that
    `saescope serve` started (`socket`), one this app starts itself (`own`: tests, embedding), or none
    (`off`: why). `limits` are the caps the API states and checks."""

    limits: LiveConfig = field(default_factory=LiveConfig)
    socket: str | None = None
    off: str | None = None
    own: bool = False

    @classmethod
    def none(cls, why: str = OFF_HERE, limits: LiveConfig | None = None) -> LiveLink:
        return cls(limits or LiveConfig(), off=why)


@dataclass
class Gateway:
    """app.state.live: the client of the model process, or why there is none."""

    limits: LiveConfig
    client: LiveClient | None = None
    off: str | None = None
    own_pool: ModelPool | None = None  # started by this app (no `saescope serve` around it)

    @classmethod
    def connect(cls, db_url: str, link: LiveLink) -> Gateway:
        if link.own:
            return cls(link.limits, own_pool=ModelPool(db_url, link.limits))
        if link.socket is None:
            return cls(link.limits, off=link.off or OFF_HERE)
        return cls(link.limits, client=LiveClient(link.socket))

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

    def stream(self, request: Request, payload: dict) -> AsyncIterator[dict]:
        if self.client is None:
            raise Unavailable(f"live features are off: {self.off}")
        return self.client.stream(payload, request.is_disconnected)

    async def status(self) -> dict:
        """Whether the model is up, and the live limits."""
        if self.client is None:
            return {"state": "off", "detail": f"live features are off: {self.off}", "limits": asdict(self.limits)}
        try:
            return await self.client.call({"op": "status"})
        except Unavailable as exc:
            return {"state": "starting", "detail": str(exc), "limits": asdict(self.limits)}


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Starts and stops the model process this app owns, if any."""
    app.state.live.start()
    try:
        yield
    finally:
        app.state.live.stop()


# ---------------------------------------------------------------------- the work


def check(conn: Connection, sae: str, features: list[int]) -> dict[int, float]:
    """NotFound for an unknown or unmined SAE or a feature past its width; the features' max activations."""
    for index in features or [0]:
        queries.feature_ref(conn, sae, index)
    rows = conn.execute(
        select(Feature.index, Feature.max_act)
        .join(SAE, SAE.active_run_id == Feature.run_id)
        .where(SAE.name == sae, Feature.index.in_(features))
    )
    return {int(i): float(m) for i, m in rows}


async def sae_or_404(request: Request, sae: str) -> None:
    await read_connection(request, check, sae, [])


async def activations(request: Request, sae: str, body: ActivationsRequest) -> dict:
    await read_connection(request, check, sae, [] if body.feature is None else [body.feature])
    payload = {"op": "encode", "sae": sae, "text": body.text, "feature": body.feature, "top": body.top}
    return await request.app.state.live.call(request, payload)


def _steer_payload(body: SteerRequest) -> dict:
    return {
        "op": "generate",
        "sae": body.sae,
        "prompt": body.prompt,
        "interventions": [[iv.feature, iv.mode, iv.value, iv.condition] for iv in body.interventions],
        "settings": asdict(body.settings()),
        "frozen_attention": body.frozen_attention,
    }


def _interventions(body: SteerRequest | ChatRequest) -> list[Intervention]:
    """The request's interventions as the runtime's (LiveError for a condition the runtime cannot read)."""
    return [
        Intervention(iv.feature, iv.mode, iv.value, Condition.parse(iv.condition) if iv.condition else None) for iv in body.interventions
    ]


def _steer_link(body: SteerRequest) -> Callable[[dict], dict]:
    link = steer_permalink(body.sae, body.prompt, _interventions(body), body.settings()) + ("&frozen=1" if body.frozen_attention else "")
    return lambda result: {**result, "permalink": link}


async def steer(request: Request, body: SteerRequest) -> dict:
    await read_connection(request, check, body.sae, [iv.feature for iv in body.interventions])
    link = _steer_link(body)  # a bad condition is a 422 before the model runs
    result = await request.app.state.live.call(request, _steer_payload(body))
    return link(result)


def chat_permalink(body: ChatRequest) -> str:
    """The chat page's URL for this turn: its system and user messages, interventions (with their `when`
    as the steering page's permalink has it), seed and settings."""
    query: list[tuple[str, object]] = []
    for m in body.messages:
        query.append((m.role, m.content))
    interventions = _interventions(body)
    conditional = any(iv.condition is not None for iv in interventions)
    for iv in interventions:
        query += [("feature", iv.feature), ("mode", iv.mode), ("value", f"{iv.value:g}")]
        if conditional:  # one `when` per intervention, aligned ("" = always), only when some are conditional
            query.append(("when", iv.condition.spec() if iv.condition else ""))
    query += [
        ("max_new_tokens", body.max_new_tokens),
        ("temperature", f"{body.temperature:g}"),
        ("top_p", f"{body.top_p:g}"),
        ("seed", body.seed),
    ]
    return f"/saes/{quote(body.sae, safe='')}/chat?{urlencode(query)}"


def _chat_payload(body: ChatRequest) -> dict:
    return {
        "op": "chat",
        "sae": body.sae,
        "messages": [m.model_dump() for m in body.messages],
        "interventions": [[iv.feature, iv.mode, iv.value, iv.condition] for iv in body.interventions],
        "settings": asdict(body.settings()),
    }


async def chat(request: Request, body: ChatRequest) -> dict:
    await read_connection(request, check, body.sae, [iv.feature for iv in body.interventions])
    link = chat_permalink(body)  # a bad condition is a 422 before the model runs
    result = await request.app.state.live.call(request, _chat_payload(body))
    return {**result, "permalink": link}


def _sse(event: str, data: dict) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


async def _stream(request: Request, payload: dict, finish: Callable[[dict], dict]) -> StreamingResponse:
    """Server-sent events of a generation (schemas.STREAM_DOC). The first event is awaited before the
    response starts, so that a refusal known then (loading, busy, a bad chat turn) is a plain status."""
    events = request.app.state.live.stream(request, payload)
    first = await events.__anext__()

    async def body() -> AsyncIterator[bytes]:
        try:
            event: dict | None = first
            while event is not None:
                if "result" in event:
                    yield _sse("done", finish(event["result"]))
                    return
                if "progress" in event:
                    yield _sse("progress", event["progress"])
                else:
                    yield _sse("token", event)
                event = await events.__anext__()
        except ClientGone:
            return
        except (LiveError, NotFound) as exc:
            yield _sse("error", {"status": getattr(exc, "status", 404), "detail": str(exc)})
        except RuntimeError as exc:
            yield _sse("error", {"status": 500, "detail": str(exc)})
        finally:
            await events.aclose()  # closes the model process's connection: a generation still running stops

    headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
    return StreamingResponse(body(), media_type="text/event-stream", headers=headers)


def stream_refused(exc: Exception) -> StreamingResponse:
    """For the pages: a refusal as a stream of one `error` event (HTTP 200, as the htmx cards are), so
    the page shows the reason and the browser logs no failed request."""
    status = getattr(exc, "status", 404 if isinstance(exc, NotFound) else 422)
    retry = getattr(exc, "retry_after", None)

    async def body() -> AsyncIterator[bytes]:
        yield _sse("error", {"status": status, "detail": str(exc), "retry_after": retry})

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-store"})


async def steer_stream(request: Request, body: SteerRequest, page: Callable[[dict], dict] | None = None) -> StreamingResponse:
    """`page`: what the steering page adds to the `done` event, made from the answer (its result fragment)."""
    await read_connection(request, check, body.sae, [iv.feature for iv in body.interventions])
    link = _steer_link(body)

    def finish(result: dict) -> dict:
        answer = _answer(link(result))
        return {**answer, **page(answer)} if page is not None else answer

    return await _stream(request, _steer_payload(body), finish)


async def chat_stream(request: Request, body: ChatRequest) -> StreamingResponse:
    await read_connection(request, check, body.sae, [iv.feature for iv in body.interventions])
    link = chat_permalink(body)
    return await _stream(request, _chat_payload(body), lambda result: _answer({**result, "permalink": link}))


def _answer(result: dict) -> dict:
    """A generation's answer as the non-streamed endpoint gives it (its response model's fields)."""
    return SteerResponse.model_validate(result).model_dump(mode="json")


async def _check_sweep(request: Request, sweep: SweepRequest) -> None:
    features = [sweep.intervention.feature] + ([sweep.target_feature] if sweep.target_feature is not None else [])
    await read_connection(request, check, sweep.sae, features)


async def sweep(request: Request, sweep: SweepRequest) -> dict:
    """A strength sweep (sae_core/live/sweep.py) run by the model process, with its permalink."""
    await _check_sweep(request, sweep)
    result = await request.app.state.live.call(request, {"op": "sweep", "request": sweep.canonical()})
    return {**result, "permalink": sweep_permalink(sweep)}


async def sweep_stream(request: Request, sweep: SweepRequest, finish: Callable[[dict], dict]) -> StreamingResponse:
    """The sweep's progress events ({stage, done, total}: generated tokens) as it runs, then `done`."""
    await _check_sweep(request, sweep)
    return await _stream(request, {"op": "sweep", "request": sweep.canonical()}, finish)


async def graph(request: Request, payload: dict) -> dict:
    """An attribution graph built (or found stored) by the model process (op "trace": sae_core/live/graphs.py)."""
    return await request.app.state.live.call(request, {"op": "trace", "request": payload})


async def graph_stream(request: Request, payload: dict, finish: Callable[[dict], dict]) -> StreamingResponse:
    """The graph build's progress events ({stage, done, total, unit}: attribution targets), then `done`."""
    return await _stream(request, {"op": "trace", "request": payload}, finish)


async def or_gone(work: Awaitable[Any]) -> Any:
    try:
        return await work
    except ClientGone:
        return Response(status_code=499)  # nobody reads it: the client closed the connection
