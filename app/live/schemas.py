"""Request and response models of the live API (app/live/api.py), and its error responses."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, create_model

from sae_core.config import GenerationConfig, LiveConfig
from sae_core.live.interventions import Mode

from ..schemas import Problem

MAX_TEXT_CHARS = 20_000  # before tokenizing; past LiveConfig's token caps a text is cut (the answer says by how much)
MAX_INDEX = 2**31 - 1  # a feature index, as the store keeps it
DETERMINISM = "deterministic for a given seed, model dtype and machine kind"

# A condition as steering and sweeps take it (sae_core/live/interventions.py's CONDITION, without NULs).
CONDITION_PATTERN = r"(gen|prompt|([^:\x00]+:)?\d+\s*>\s*-?\d+(\.\d*)?(e[-+]?\d+)?)"
CONDITION_DOC = "apply only where it holds: gen (generated positions), prompt, FEATURE>THRESHOLD or SAE:FEATURE>THRESHOLD"
MODE_DOC = (
    "clamp: set the latent to value; add: add value x the unit decoder direction; scale: multiply the latent by value; "
    "cap: limit the residual's component along the unit decoder direction to value (below it, untouched); "
    "ortho: scale that component by value, the orthogonal rest untouched (Neuronpedia's orthogonal decomposition)"
)
NO_NUL = r"^[^\x00]*$"  # an SAE name holds no NUL (PostgreSQL stores none in text; app.http.RefuseNul for paths)


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
    mode: Mode = Field(description=MODE_DOC)
    value: float = Field(gt=-1e6, lt=1e6)
    condition: str | None = Field(None, max_length=200, pattern=f"^{CONDITION_PATTERN}$", description=CONDITION_DOC)


class SteerRequest(BaseModel):
    """What the steering page's form gives; the API's model is `limited_steer_request`'s, with this server's caps."""

    sae: str = Field(max_length=200, pattern=NO_NUL)
    prompt: str = Field(min_length=1, max_length=MAX_TEXT_CHARS, description="past the server's max_prompt_tokens its end is continued")
    interventions: list[InterventionModel] = Field(
        default_factory=list, max_length=64, description="applied in order; several on one feature compose"
    )
    max_new_tokens: int = Field(32, ge=1, le=4096)
    temperature: float = Field(0.0, ge=0, le=10, description="0: greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int = Field(0, ge=0, le=2**32 - 1)
    frozen_attention: bool = Field(False, description="also the steered run with the unsteered run's attention patterns (`frozen`)")

    def settings(self) -> GenerationConfig:
        return GenerationConfig(self.max_new_tokens, self.temperature, self.top_p, self.seed)


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=MAX_TEXT_CHARS)


class ChatRequest(BaseModel):
    """A chat turn through the model's chat template: the messages (the last one the user's), the
    assistant's default and steered replies generated. The API's model is `limited_chat_request`'s."""

    sae: str = Field(max_length=200, pattern=NO_NUL)
    messages: list[ChatMessage] = Field(
        min_length=1, max_length=32, description="system, user and earlier assistant messages, the user's last"
    )
    interventions: list[InterventionModel] = Field(default_factory=list, max_length=64, description="applied in order at the SAE's hook")
    max_new_tokens: int = Field(64, ge=1, le=4096)
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
    frozen: ContinuationModel | None = Field(None, description="with frozen_attention: the steered run with the unsteered attention")
    frozen_diverges_at: int | None = Field(None, description="first generated position where `frozen` differs from `default`")
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


def limited_chat_request(limits: LiveConfig) -> type[ChatRequest]:
    """ChatRequest with this server's caps in its schema (see limited_steer_request)."""
    default = min(64, limits.max_new_tokens_limit)
    interventions: Any = Field(default_factory=list, max_length=limits.max_interventions, description="applied in order at the SAE's hook")
    return create_model(
        "ChatRequest",
        __base__=ChatRequest,
        interventions=(list[InterventionModel], interventions),
        max_new_tokens=(int, Field(default, ge=1, le=limits.max_new_tokens_limit)),
    )


STREAM_DOC = (
    "Server-sent events (text/event-stream): `token` events {which: default|steered|frozen, text} as the tokens are generated "
    "(the default reply first, then the steered one, then with frozen_attention the frozen one; each one's texts concatenate to "
    "its final text), for a sweep `progress` events {stage: baseline|sweep|heldout, done, total} (generated tokens), then one "
    "`done` event with the whole answer (the non-streamed endpoint's body), or one `error` event {status, detail}. Refusals "
    "known before the first event (404, 422, 503) are plain statuses. A client that closes the connection stops the generation."
)
# One server-sent event as a client's parser hands it over (the fields of the SSE wire format; `data` is JSON text).
SSE_EVENT: dict[str, Any] = {
    "type": "object",
    "properties": {"event": {"type": "string"}, "data": {"type": "string"}, "id": {"type": "string"}, "retry": {"type": "integer"}},
    "required": ["data"],
}
STREAM_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/event-stream": {"schema": SSE_EVENT}}, "description": STREAM_DOC},
}


class SweepBody(BaseModel):
    """A strength sweep (sae_core/live/sweep.py): the intervention at each strength over the prompts."""

    sae: str = Field(max_length=200, pattern=NO_NUL)
    intervention: str = Field(
        max_length=200,
        pattern=rf"^\d{{1,9}}:(clamp|add|scale|cap|ortho):-?\d{{1,5}}(\.\d{{0,6}})?(@{CONDITION_PATTERN})?$",
        description="FEATURE:MODE:VALUE[@CONDITION], as steering takes them (MODE: clamp, add, scale, cap or ortho; CONDITION: "
        "gen, prompt, FEATURE>THRESHOLD or SAE:FEATURE>THRESHOLD); the value is replaced by each strength",
    )
    strengths: list[Annotated[float, Field(gt=-1e6, lt=1e6)]] = Field(min_length=1, max_length=16)
    prompts: list[Annotated[str, Field(min_length=1, max_length=2000)]] | None = Field(
        None, max_length=16, description="None: the built-in set"
    )
    heldout: list[Annotated[str, Field(min_length=1, max_length=2000)]] | None = Field(
        None, max_length=16, description="None: the built-in held-out prompts; []: no check"
    )
    target_feature: int | None = Field(None, ge=0, le=MAX_INDEX, description="lift on this feature (None: the intervention's)")
    target_token: str | None = Field(None, min_length=1, max_length=100, description="lift = this token's probability instead")
    max_new_tokens: int = Field(32, ge=1, le=256)
    max_cost_increase: float = Field(1.0, ge=0, le=100, description="nats per token over the unsteered fluency the suggestion may spend")


class SweepPointModel(BaseModel):
    strength: float | None = Field(description="null: the unsteered model (the baseline)")
    lift: float = Field(description="the target feature's mean activation on the generated tokens, or the target token's probability")
    kl: float = Field(description="mean KL(steered || unsteered) of the next-token distributions, nats")
    fluency: float = Field(description="the unsteered model's mean loss on the steered generated tokens, nats per token")
    texts: list[str] = Field(description="one continuation per prompt")
    token_ids: list[list[int]]


class SweepResponse(BaseModel):
    sae: str
    run_id: int = Field(description="the mining run whose SAE weights answered")
    key: str = Field(description="the digest of the canonical request: GET /api/v1/sweeps/{key} returns the stored sweep")
    request: dict[str, Any] = Field(description="the canonical request")
    prompts: list[str]
    baseline: SweepPointModel
    points: list[SweepPointModel] = Field(description="one per strength, in the order given")
    suggested: float | None = Field(description="the highest lift whose fluency cost stays within max_cost_increase; null: none")
    heldout_prompts: list[str]
    heldout: list[SweepPointModel] = Field(description="[unsteered, suggested] on the held-out prompts; [] without a suggestion")
    stopped: str | None = Field(description="cancelled or time_limit when cut short (the points are partial; not stored)")
    seconds: float = Field(description="the computation's wall time")
    lift_kind: Literal["feature", "token"]
    computed_at: str = Field(description="when the sweep finished (UTC, ISO 8601)")
    stored: bool = Field(description="answered from the store: computed earlier (at computed_at), not run for this request")
    permalink: str = Field(description="the sweep page of this request, which shows the stored result")


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
