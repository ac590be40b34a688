"""The live pages: features on the user's own text (`/saes/{sae}/inference`, the feature page's "try it"
box), steering (`/saes/{sae}/steer?...`), chat and sweeps. The GET pages render the form from the store
alone; their results come from a POST that the page makes on load (a fragment htmx requests, or for
steering, chat and sweeps a stream of server-sent events that static/live_stream.js reads), so a
permalink (prompt, interventions, seed and settings in its query) reproduces its result whenever it is
opened. Whether the model is up is a fragment of its own (/live/status), never cached."""

from __future__ import annotations

import functools
import json
import math
from typing import Annotated, Any, Awaitable, Callable
from urllib.parse import quote, urlencode

from fastapi import APIRouter, Depends, Form, Path, Query, Request
from fastapi.responses import Response
from pydantic import ValidationError
from sqlalchemy import Connection

from sae_core.config import GenerationConfig, LiveConfig
from sae_core.errors import NotFound
from sae_core.live.errors import LiveError, Loading
from sae_core.live.interventions import MODES, Intervention
from sae_core.live.pool import ClientGone
from sae_core.live.sweep import BUILTIN_PROMPTS, SweepRequest, sweep_permalink
from sae_core.store.sweeps import find_sweep

from ..deps import read_connection
from ..render import heat, templates
from ..svg_plots import Axis, Point, Series, scatter_svg
from . import gateway
from .schemas import DETERMINISM, MAX_TEXT_CHARS, ActivationsRequest, ChatMessage, ChatRequest, InterventionModel, SteerRequest

router = APIRouter(include_in_schema=False)
SaeName = Path(max_length=200)
STEER_DEFAULTS = GenerationConfig()


@router.get("/live/status")
async def status_fragment(request: Request) -> Response:
    return templates.TemplateResponse(request, "_live_status.html", {"status": await request.app.state.live.status()})


@router.get("/saes/{sae}/inference")
async def inference_page(request: Request, sae: str = SaeName) -> Response:
    await gateway.sae_or_404(request, sae)
    return templates.TemplateResponse(request, "inference.html", {"sae": sae, "max_chars": MAX_TEXT_CHARS})


def _error(request: Request, exc: Exception, form: str = "", vals: dict | None = None) -> Response:
    """The fragment for a live result that failed. While the model loads, a card that says so and posts
    `form` again by itself after the Retry-After, replacing itself with the result."""
    if isinstance(exc, Loading):
        ctx = {"reason": str(exc), "retry": max(1, round(exc.retry_after or 2)), "form": form, "vals": json.dumps(vals or {})}
        return templates.TemplateResponse(request, "_live_loading.html", ctx)
    status = getattr(exc, "status", 422 if isinstance(exc, LiveError) else 500)
    # a fragment for htmx to swap in (htmx leaves non-2xx answers unswapped): the status is in the card
    return templates.TemplateResponse(
        request, "_live_error.html", {"status": status, "reason": str(exc), "retry": getattr(exc, "retry_after", None)}
    )


@router.post("/saes/{sae}/inference/result")
async def inference_result(
    request: Request, sae: str = SaeName, text: Annotated[str, Form(max_length=MAX_TEXT_CHARS)] = "", feature: Annotated[str, Form()] = ""
) -> Response:
    try:
        chosen = int(feature) if feature.strip() else None
        body = ActivationsRequest(text=text or " ", feature=chosen, top=8) if text else None
        if body is None:
            raise LiveError("type or paste a text first")
        result = await gateway.activations(request, sae, body)
    except ClientGone:
        return Response(status_code=499)
    except (LiveError, NotFound, ValueError) as exc:
        return _error(request, exc, "#inference-form", {"feature": feature})
    return templates.TemplateResponse(request, "_live_tokens.html", _tokens_view(sae, result))


def _tokens_view(sae: str, result: dict) -> dict:
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


@router.post("/saes/{sae}/features/{index}/try")
async def feature_try(
    request: Request, sae: str = SaeName, index: int = Path(ge=0, le=2**31 - 1), text: Annotated[str, Form()] = ""
) -> Response:
    """The feature page's "try it on your text" box: the text highlighted by this feature (relative to its mined max)."""
    try:
        if not text.strip():
            raise LiveError("type or paste a text first")
        maxima = await read_connection(request, gateway.check, sae, [index])
        result = await gateway.activations(request, sae, ActivationsRequest(text=text[:MAX_TEXT_CHARS], feature=index, top=1))
    except ClientGone:
        return Response(status_code=499)
    except (LiveError, NotFound) as exc:
        return _error(request, exc, "#try-form")
    mined_max = maxima.get(index, 0.0)
    scale = mined_max if mined_max > 0 else max(result["feature_acts"], default=0.0)
    view = {"sae": sae, "index": index, "result": result, "heats": [heat(a, scale) for a in result["feature_acts"]], "mined_max": mined_max}
    view["strongest"] = max(result["feature_acts"], default=0.0)
    return templates.TemplateResponse(request, "_live_feature_text.html", view)


def _form_interventions(
    features: list[str], modes: list[str], values: list[str], whens: list[str] | None = None
) -> list[InterventionModel]:
    out = []
    whens = whens or []
    for i, raw in enumerate(features):
        if not raw.strip():
            continue
        mode = modes[i] if i < len(modes) and modes[i] in MODES else "clamp"
        value = values[i] if i < len(values) and values[i].strip() else "0"
        when = whens[i].strip() if i < len(whens) and whens[i].strip() else None
        try:
            out.append(InterventionModel(feature=int(raw), mode=mode, value=float(value), condition=when))  # type: ignore[arg-type]
        except ValidationError as exc:  # a ValueError too: the field's own reason, not the parsing one below
            raise LiveError(f"intervention {i + 1}: {_refused(exc)}") from exc
        except ValueError as exc:
            raise LiveError(f"intervention {i + 1}: feature must be a whole number and value a number ({raw!r}, {value!r})") from exc
    return out


def _rows(feature: list[str], mode: list[str], value: list[str], when: list[str], at_least: int) -> list[dict]:
    """The intervention table's rows from a permalink's aligned lists, padded with empty rows."""

    def at(values: list[str], i: int, default: str) -> str:
        return values[i] if i < len(values) else default

    rows = [
        {"feature": f, "mode": at(mode, i, "clamp"), "value": at(value, i, ""), "when": at(when, i, "")}
        for i, f in enumerate(feature)
        if f.strip()
    ]
    return rows + [{"feature": "", "mode": "clamp", "value": "", "when": ""} for _ in range(max(1, at_least - len(rows)))]


@router.get("/saes/{sae}/steer")
async def steer_page(
    request: Request,
    sae: str = SaeName,
    prompt: str = Query("", max_length=MAX_TEXT_CHARS),
    feature: list[str] = Query([]),
    mode: list[str] = Query([]),
    value: list[str] = Query([]),
    when: list[str] = Query([]),
    frozen: str = Query("", max_length=5),
    max_new_tokens: int = Query(STEER_DEFAULTS.max_new_tokens, ge=1, le=4096),
    temperature: float = Query(STEER_DEFAULTS.temperature, ge=0, le=10),
    top_p: float = Query(STEER_DEFAULTS.top_p, gt=0, le=1),
    seed: int = Query(STEER_DEFAULTS.seed, ge=0, le=2**32 - 1),
) -> Response:
    await gateway.sae_or_404(request, sae)
    rows = _rows(feature, mode, value, when, 4)
    settings = GenerationConfig(max_new_tokens, temperature, top_p, seed)
    ctx = {
        "sae": sae,
        "prompt": prompt,
        "rows": rows,
        "settings": settings,
        "modes": MODES,
        "determinism": DETERMINISM,
        "run": bool(prompt),
        "frozen": bool(frozen),
    }
    return templates.TemplateResponse(request, "steer.html", ctx)


class SteerForm:
    """The steering page's form, defined once for its rendered result and its stream."""

    def __init__(
        self,
        prompt: Annotated[str, Form(max_length=MAX_TEXT_CHARS)] = "",
        feature: Annotated[list[str], Form()] = [],  # noqa: B006 - FastAPI copies form defaults
        mode: Annotated[list[str], Form()] = [],  # noqa: B006
        value: Annotated[list[str], Form()] = [],  # noqa: B006
        when: Annotated[list[str], Form()] = [],  # noqa: B006
        frozen: Annotated[str, Form(max_length=5)] = "",
        max_new_tokens: Annotated[int, Form(ge=1, le=4096)] = STEER_DEFAULTS.max_new_tokens,
        temperature: Annotated[float, Form(ge=0, le=10)] = STEER_DEFAULTS.temperature,
        top_p: Annotated[float, Form(gt=0, le=1)] = STEER_DEFAULTS.top_p,
        seed: Annotated[int, Form(ge=0, le=2**32 - 1)] = STEER_DEFAULTS.seed,
    ) -> None:
        self.prompt, self.feature, self.mode, self.value, self.when, self.frozen = prompt, feature, mode, value, when, frozen
        self.max_new_tokens, self.temperature, self.top_p, self.seed = max_new_tokens, temperature, top_p, seed

    def body(self, sae: str) -> SteerRequest:
        """The steering request (LiveError without a prompt; pydantic's ValidationError for a bad field)."""
        if not self.prompt:
            raise LiveError("write a prompt first")
        interventions = _form_interventions(self.feature, self.mode, self.value, self.when)
        return SteerRequest(
            sae=sae,
            prompt=self.prompt,
            interventions=interventions,
            frozen_attention=bool(self.frozen),
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
        )


def _spec(iv: InterventionModel) -> str:
    return f"{iv.feature}:{iv.mode}:{iv.value:g}" + (f"@{iv.condition}" if iv.condition else "")


def _sweep_link(sae: str, body: SteerRequest) -> str | None:
    """The sweep page for the request's first intervention (a sweep takes one), at strengths from a quarter
    to four times its value (the sweep page's own strengths for a value of 0), over the built-in prompts."""
    if not body.interventions:
        return None
    iv = body.interventions[0]
    query: list[tuple[str, str]] = [("intervention", _spec(iv))]
    if iv.value:
        query += [("strength", f"{iv.value * k:g}") for k in (0.25, 0.5, 1, 2, 4) if abs(iv.value * k) < 1e6]
    return f"/saes/{quote(sae, safe='')}/sweep?{urlencode(query)}"


def _steer_view(sae: str, body: SteerRequest, result: dict) -> dict:
    """The steering result fragment's context (_live_steer.html), for the rendered result and the stream's end."""
    diverge = result["diverges_at"]
    return {
        "sae": sae,
        "result": result,
        "diverge": len(result["steered"]["tokens"]) if diverge is None else diverge,
        "determinism": DETERMINISM,
        "interventions": [_spec(iv) for iv in body.interventions],
        "sweep_link": _sweep_link(sae, body),
    }


@router.post("/saes/{sae}/steer/result")
async def steer_result(request: Request, form: Annotated[SteerForm, Depends()], sae: str = SaeName) -> Response:
    """The steering result as one fragment (the page streams it instead: steer_stream)."""
    try:
        body = form.body(sae)
        result = await gateway.steer(request, body)
    except ClientGone:
        return Response(status_code=499)
    except (LiveError, NotFound) as exc:
        return _error(request, exc, "#steer-form")
    return templates.TemplateResponse(request, "_live_steer.html", _steer_view(sae, body, result))


CHAT_DEFAULTS = GenerationConfig(max_new_tokens=64)


@router.get("/saes/{sae}/chat")
async def chat_page(
    request: Request,
    sae: str = SaeName,
    system: str = Query("", max_length=MAX_TEXT_CHARS),
    user: str = Query("", max_length=MAX_TEXT_CHARS),
    feature: list[str] = Query([]),
    mode: list[str] = Query([]),
    value: list[str] = Query([]),
    when: list[str] = Query([]),
    max_new_tokens: int = Query(CHAT_DEFAULTS.max_new_tokens, ge=1, le=4096),
    temperature: float = Query(CHAT_DEFAULTS.temperature, ge=0, le=10),
    top_p: float = Query(CHAT_DEFAULTS.top_p, gt=0, le=1),
    seed: int = Query(CHAT_DEFAULTS.seed, ge=0, le=2**32 - 1),
) -> Response:
    """A chat turn (system and user message) through the model's chat template, the default and the
    steered reply streamed side by side; the page's query is its permalink (the turn runs on load)."""
    await gateway.sae_or_404(request, sae)
    ctx = {
        "sae": sae,
        "system": system,
        "user": user,
        "rows": _rows(feature, mode, value, when, 3),
        "settings": GenerationConfig(max_new_tokens, temperature, top_p, seed),
        "modes": MODES,
        "determinism": DETERMINISM,
        "run": bool(user.strip()),
    }
    return templates.TemplateResponse(request, "chat.html", ctx)


def _refused(exc: ValidationError) -> LiveError:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    return LiveError(f"{where}: {first['msg']}" if where else first["msg"])


def _streamed(route: Callable[..., Awaitable[Response]]) -> Callable[..., Awaitable[Response]]:
    """A page's stream endpoint: refusals as one `error` event (gateway.stream_refused), 499 when the client left."""

    @functools.wraps(route)  # FastAPI reads the route's parameters through __wrapped__
    async def streamed(*args: Any, **kwargs: Any) -> Response:
        try:
            return await route(*args, **kwargs)
        except ClientGone:
            return Response(status_code=499)
        except (LiveError, NotFound) as exc:
            return gateway.stream_refused(exc)

    return streamed


@router.post("/saes/{sae}/chat/stream")
@_streamed
async def chat_stream(
    request: Request,
    sae: str = SaeName,
    system: Annotated[str, Form(max_length=MAX_TEXT_CHARS)] = "",
    user: Annotated[str, Form(max_length=MAX_TEXT_CHARS)] = "",
    feature: Annotated[list[str], Form()] = [],  # noqa: B006 - FastAPI copies form defaults
    mode: Annotated[list[str], Form()] = [],  # noqa: B006
    value: Annotated[list[str], Form()] = [],  # noqa: B006
    when: Annotated[list[str], Form()] = [],  # noqa: B006
    max_new_tokens: Annotated[int, Form(ge=1, le=4096)] = CHAT_DEFAULTS.max_new_tokens,
    temperature: Annotated[float, Form(ge=0, le=10)] = CHAT_DEFAULTS.temperature,
    top_p: Annotated[float, Form(gt=0, le=1)] = CHAT_DEFAULTS.top_p,
    seed: Annotated[int, Form(ge=0, le=2**32 - 1)] = CHAT_DEFAULTS.seed,
) -> Response:
    """The chat page's form, streamed (server-sent events; errors before the first token as JSON 4xx)."""
    if not user.strip():
        raise LiveError("write a message first")
    messages = ([ChatMessage(role="system", content=system)] if system.strip() else []) + [ChatMessage(role="user", content=user)]
    try:
        body = ChatRequest(
            sae=sae,
            messages=messages,
            interventions=_form_interventions(feature, mode, value, when),
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
        )
    except ValidationError as exc:
        raise _refused(exc) from exc
    limits = request.app.state.live.limits
    if len(body.interventions) > limits.max_interventions or body.max_new_tokens > limits.max_new_tokens_limit:
        raise LiveError(f"at most {limits.max_interventions} interventions and {limits.max_new_tokens_limit} new tokens on this server")
    return await gateway.chat_stream(request, body)


@router.post("/saes/{sae}/steer/stream")
@_streamed
async def steer_stream(request: Request, form: Annotated[SteerForm, Depends()], sae: str = SaeName) -> Response:
    """The steering page's form, streamed (server-sent events; errors before the first token as JSON 4xx).
    Its `done` event also carries `html`: the result fragment (tokens, where they diverge, the permalink)."""
    try:
        body = form.body(sae)
    except ValidationError as exc:
        raise _refused(exc) from exc
    limits = request.app.state.live.limits
    if len(body.interventions) > limits.max_interventions or body.max_new_tokens > limits.max_new_tokens_limit:
        raise LiveError(f"at most {limits.max_interventions} interventions and {limits.max_new_tokens_limit} new tokens on this server")

    def fragment(answer: dict) -> dict:
        return {"html": templates.get_template("_live_steer.html").render(_steer_view(sae, body, answer))}

    return await gateway.steer_stream(request, body, fragment)


# ---------------------------------------------------------------------- sweeps


def _sweep_request(
    sae: str, intervention: str, strengths: list[str], prompts: list[str], heldout: list[str], target_feature: str, target_token: str,
    max_new_tokens: int, max_cost_increase: float, limits: LiveConfig, no_heldout: bool = False, verbatim: list[str] | None = None,
) -> SweepRequest:  # fmt: skip
    """The sweep the form or the permalink asks for; LiveError with the reason otherwise. Strengths may
    come one per field or comma-separated in one; prompts one per line of the form's fields (none: the
    built-in set), and `verbatim` prompts (the permalink's `prompt`s) as they are. `no_heldout`: no held-out
    check (the permalink's `no_heldout=1`; an empty held-out field means the built-in held-out prompts)."""
    from sae_core.live.sweep import MAX_PROMPTS, MAX_STRENGTHS

    if not intervention.strip():
        raise LiveError("name the intervention: FEATURE:MODE:VALUE[@CONDITION], e.g. 3758:add:1 (the value is replaced by each strength)")
    iv = Intervention.parse(intervention)
    values: list[float] = []
    for raw in (part for field in strengths for part in field.replace(";", ",").split(",")):
        if raw.strip():
            try:
                values.append(float(raw))
            except ValueError as exc:
                raise LiveError(f"strength {raw.strip()!r} is not a number") from exc
    if not values:
        raise LiveError("give at least one strength (e.g. 1, 2, 4, 8)")
    if len(values) > MAX_STRENGTHS or not all(math.isfinite(v) and abs(v) < 1e6 for v in values):
        raise LiveError(f"at most {MAX_STRENGTHS} strengths, each finite and under 1e6 in size")
    lines = [p for p in verbatim or [] if p] + [line.strip() for field in prompts for line in field.splitlines() if line.strip()]
    held = [line.strip() for field in heldout for line in field.splitlines() if line.strip()]
    if no_heldout and held:
        raise LiveError("held-out prompts are given and the held-out check is off: clear one")
    if len(lines) > MAX_PROMPTS or len(held) > MAX_PROMPTS:
        raise LiveError(f"at most {MAX_PROMPTS} prompts and {MAX_PROMPTS} held-out prompts")
    if not 1 <= max_new_tokens <= min(limits.max_new_tokens_limit, 256):
        raise LiveError(f"new tokens must be between 1 and {min(limits.max_new_tokens_limit, 256)}")
    target = None
    if target_feature.strip():
        try:
            target = int(target_feature)
        except ValueError as exc:
            raise LiveError(f"target feature {target_feature!r} is not a whole number") from exc
    held_out = () if no_heldout else tuple(held) or None
    return SweepRequest(
        sae, iv, tuple(values), tuple(lines) or None, held_out, target, target_token or None, max_new_tokens, max_cost_increase
    )


def _stored_view(conn: Connection, key: str) -> dict | None:
    """The stored sweep with this key as the result fragment's context (None: not stored)."""
    found = find_sweep(conn, key)
    if found is None:
        return None
    link = sweep_permalink(SweepRequest.from_dict(found.request))
    view = sweep_view({**found.result, "stored": True}, link)
    view["computed_at"] = found.created_at.strftime("%Y-%m-%d %H:%M:%S UTC")
    view["live_run_id"] = None if found.current else found.live_run_id
    return view


@router.get("/saes/{sae}/sweep")
async def sweep_page(
    request: Request,
    sae: str = SaeName,
    intervention: str = Query("", max_length=200),
    strength: list[str] = Query([]),
    strengths: str = Query("", max_length=400),
    prompt: list[str] = Query([]),
    prompts: str = Query("", max_length=MAX_TEXT_CHARS),
    heldout: list[str] = Query([]),
    no_heldout: str = Query("", max_length=5),
    target_feature: str = Query("", max_length=12),
    target_token: str = Query("", max_length=100),
    max_new_tokens: int = Query(32, ge=1, le=4096),
    max_cost_increase: float = Query(1.0, ge=0, le=100),
    key: str = Query("", max_length=64),
) -> Response:
    """A strength sweep: the form, and (when the query names an intervention: a permalink) its result. A
    stored sweep (the request's digest, recomputed from the query, is in the store) is shown from the store
    with when it was computed: no model runs, and it shows even with the live features off. Otherwise the
    result is streamed: progress while the model process runs it, then the lift and cost charts. The query's
    `key` is not trusted: a hand-edited query is a different request."""
    await gateway.sae_or_404(request, sae)
    stored = None
    if intervention.strip():
        try:
            sweep = _sweep_request(
                sae, intervention, [*strength, strengths], [prompts], heldout, target_feature, target_token, max_new_tokens,
                max_cost_increase, request.app.state.live.limits, bool(no_heldout), prompt,
            )  # fmt: skip
        except LiveError:
            sweep = None  # the stream says why
        if sweep is not None:
            stored = await read_connection(request, _stored_view, sweep.key())
    ctx = {
        "sae": sae,
        "intervention": intervention,
        "strengths": ", ".join([s for s in strength if s.strip()] + ([strengths] if strengths.strip() else [])) or "1, 2, 4, 8, 16",
        "prompts": "\n".join(prompt + ([prompts] if prompts.strip() else [])),
        "heldout": "\n".join(heldout),
        "no_heldout": bool(no_heldout),
        "target_feature": target_feature,
        "target_token": target_token,
        "max_new_tokens": max_new_tokens,
        "max_cost_increase": f"{max_cost_increase:g}",
        "builtin": BUILTIN_PROMPTS,
        "run": bool(intervention.strip()) and stored is None,
        "stored": stored,
    }
    return templates.TemplateResponse(request, "sweep.html", ctx)


@router.post("/saes/{sae}/sweep/stream")
@_streamed
async def sweep_stream(
    request: Request,
    sae: str = SaeName,
    intervention: Annotated[str, Form(max_length=200)] = "",
    strengths: Annotated[list[str], Form()] = [],  # noqa: B006 - FastAPI copies form defaults
    prompts: Annotated[list[str], Form()] = [],  # noqa: B006
    heldout: Annotated[list[str], Form()] = [],  # noqa: B006
    no_heldout: Annotated[str, Form(max_length=5)] = "",
    target_feature: Annotated[str, Form(max_length=12)] = "",
    target_token: Annotated[str, Form(max_length=100)] = "",
    max_new_tokens: Annotated[int, Form(ge=1, le=4096)] = 32,
    max_cost_increase: Annotated[float, Form(ge=0, le=100)] = 1.0,
) -> Response:
    """The sweep page's form, streamed: `progress` events, then `done` with the charts' fragment."""
    sweep = _sweep_request(
        sae, intervention, strengths, prompts, heldout, target_feature, target_token, max_new_tokens, max_cost_increase,
        request.app.state.live.limits, bool(no_heldout),
    )  # fmt: skip

    def finish(result: dict) -> dict:
        link = sweep_permalink(sweep)
        html = templates.get_template("_live_sweep.html").render(sweep_view(result, link))
        return {"permalink": link, "html": html, "suggested": result["suggested"], "stopped": result["stopped"]}

    return await gateway.sweep_stream(request, sweep, finish)


def sweep_view(result: dict, permalink: str) -> dict:
    """The sweep fragment's context: lift, and the cost (fluency, KL) against strength as SVG plots."""
    points, base = result["points"], result["baseline"]
    lift_name = "target token's probability" if result.get("lift_kind") == "token" else "feature's mean activation on the generated tokens"
    suggested = result["suggested"]

    def series(name: str, metric: str, style: int) -> Series:
        pts = [Point(p["strength"], p[metric], f"strength {p['strength']:g}: {metric} {p[metric]:.4g}") for p in points]
        return Series(name, pts, style)

    def marks(metric: str, style: int) -> list[Series]:
        out = [Series("unsteered", [Point(0.0, base[metric], f"unsteered: {metric} {base[metric]:.4g}")], 6)]
        chosen = [p for p in points if suggested is not None and p["strength"] == suggested]
        if chosen:
            out.append(Series("suggested", [Point(suggested, chosen[0][metric], f"suggested {suggested:g}")], style))
        return out

    strength = Axis("strength")
    lift_svg = scatter_svg(f"Lift: the {lift_name}", strength, Axis("lift"), [series("steered", "lift", 0), *marks("lift", 4)])
    cost_svg = scatter_svg(
        "Cost: fluency (unsteered model's loss on the steered text) and KL from the unsteered model",
        strength,
        Axis("nats per token"),
        [series("fluency", "fluency", 1), series("KL", "kl", 2), *marks("fluency", 4)],
    )
    return {"r": result, "lift_svg": lift_svg, "cost_svg": cost_svg, "permalink": permalink, "lift_name": lift_name}
