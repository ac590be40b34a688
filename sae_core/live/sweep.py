"""Strength sweeps: one intervention at a range of strengths over a set of prompts, and what each costs.

Per strength (and for the unsteered model, the baseline) over the prompts' greedy continuations:
    lift      the target feature's mean activation on the generated tokens, read by the SAE on the
              unsteered model's activations (residual; a transcoder: MLP input) over the steered text (what
              the text carries, not what the hook wrote); or, with a target token, that token's mean next-token probability under steering
    kl        mean over generated positions of KL(steered || unsteered) between the next-token
              distributions on the same prefix (the steered text's), in nats
    fluency   the unsteered model's mean loss (nats per token) on the steered generated tokens
The suggestion is the strength of highest lift whose fluency cost stays within `max_cost_increase` nats
of the baseline's (and whose lift is above the baseline's); it is checked on held-out prompts (the
baseline and the suggested strength, the same measures).

Batched: every (prompt, strength) row of a chunk is one transformers `generate` with the KV cache, the
prompts left-padded with an attention mask (position ids follow the mask), the hook steering each row at
its own strength (SteeringHook row_values); the scoring forward runs the same rows unsteered. A row's
continuation equals the single steering run's (LiveRuntime.generate, greedy) up to floating-point order
of the batch: in float32 token for token (tests/test_sweep.py on the tiny model; checked on the bundled
model too), in bfloat16 rows part after a few tokens (batched GEMMs round differently; bench/RESULTS.md).

Stored: a sweep that finishes whole (not cut short) is written to the store's `sweeps` table (sae_core/store/
sweeps.py) by LiveRuntime.sweep, keyed by the request's digest (SweepRequest.key()) and the mining run, and the
same request on the same run is answered from there without running the model. The permalink
(sweep_permalink: the whole request in the query, and its key) opens the stored result on the sweep page, and
GET /api/v1/sweeps/{key} returns it, with or without a model process. A recomputation would be greedy decoding
again, but in bfloat16 batched rows can part after a few tokens, so the stored result is the one a permalink shows.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Callable, Protocol
from urllib.parse import quote, urlencode

import torch
from transformers import GenerationConfig as HFGenerationConfig
from transformers import StoppingCriteria, StoppingCriteriaList

from .errors import LiveError
from .generation import ShouldStop
from .interventions import Condition, ConditionReader, Intervention, SteeringHook, number

if TYPE_CHECKING:
    from ..config import LiveConfig
    from ..model import LanguageModel, Site
    from ..sae.base import DictionarySAE


class SweepRuntime(Protocol):
    """What a sweep asks of the live runtime (runtime.LiveRuntime, which calls run_sweep with itself): named
    here so that this module does not import the runtime that imports it."""

    cfg: LiveConfig

    def sae(self, name: str) -> Any: ...  # the runtime's held SAE: .run (model, hook, run_id), .loaded.sae, .site

    def model(self, name: str) -> LanguageModel: ...

    def condition_saes(
        self, held: Any, interventions: list[Intervention]
    ) -> tuple[dict[str, ConditionReader], dict[str, DictionarySAE]]: ...

    def check(
        self, held: Any, interventions: list[Intervention], readers: dict[str, ConditionReader], same: dict[str, DictionarySAE]
    ) -> None: ...

    def _tokenize(self, lm: LanguageModel, text: str, what: str) -> list[int]: ...


# A small built-in set: varied openings a steered feature can show up in; the held-out ones check the suggestion.
BUILTIN_PROMPTS = [
    "Once upon a time, in a small village,",
    "The best way to spend a weekend is",
    "Scientists recently discovered that",
    "My favourite memory from childhood is",
    "The city council announced today that",
    "Here is a short poem about the sea:",
    "In the kitchen, my grandmother always",
    "The most important thing about travel is",
]
HELDOUT_PROMPTS = [
    "Yesterday I walked into the old library and",
    "The new phone that everyone is talking about",
    "When the storm finally passed, the town",
    "A good teacher knows that",
]
MAX_STRENGTHS = 16
MAX_PROMPTS = 16


@dataclass(frozen=True)
class SweepRequest:
    sae: str
    intervention: Intervention  # its value is replaced by each strength; its mode and condition are kept
    strengths: tuple[float, ...]
    prompts: tuple[str, ...] | None = None  # None: BUILTIN_PROMPTS
    heldout: tuple[str, ...] | None = None  # None: HELDOUT_PROMPTS; () for no held-out check
    target_feature: int | None = None  # lift read on this feature (None: the intervention's)
    target_token: str | None = None  # lift = this token's probability instead (its first token)
    max_new_tokens: int = 32
    max_cost_increase: float = 1.0  # nats per token above the baseline's fluency cost the suggestion may spend
    batch_rows: int = 64  # rows (prompt x strength) per forward

    def canonical(self) -> dict:
        d = asdict(self)
        d["intervention"] = self.intervention.spec()
        d["strengths"] = [float(s) for s in self.strengths]
        return d

    def key(self) -> str:
        """The request's hash: the cache key of its result."""
        return hashlib.sha256(json.dumps(self.canonical(), sort_keys=True).encode()).hexdigest()[:24]

    @classmethod
    def from_dict(cls, d: dict) -> SweepRequest:
        iv = d["intervention"]
        intervention = Intervention.parse(iv) if isinstance(iv, str) else Intervention(**iv)
        if isinstance(intervention.condition, dict):
            intervention = Intervention(intervention.feature, intervention.mode, intervention.value, Condition(**intervention.condition))
        tup = lambda v: tuple(v) if v is not None else None  # noqa: E731
        return cls(
            d["sae"], intervention, tuple(float(s) for s in d["strengths"]), tup(d.get("prompts")), tup(d.get("heldout")),
            d.get("target_feature"), d.get("target_token"), int(d.get("max_new_tokens", 32)),
            float(d.get("max_cost_increase", 1.0)), int(d.get("batch_rows", 64)),
        )  # fmt: skip


@dataclass
class SweepPoint:
    strength: float | None  # None: the unsteered model (the baseline)
    lift: float
    kl: float
    fluency: float
    texts: list[str] = field(default_factory=list)  # one continuation per prompt
    token_ids: list[list[int]] = field(default_factory=list)


@dataclass
class SweepProgress:
    stage: str  # "sweep", "baseline", "heldout"
    done: int  # generated tokens so far over all rows of all stages
    total: int


@dataclass
class SweepResult:
    sae: str
    run_id: int
    key: str
    request: dict  # SweepRequest.canonical()
    prompts: list[str]
    baseline: SweepPoint
    points: list[SweepPoint]
    suggested: float | None
    heldout_prompts: list[str]
    heldout: list[SweepPoint]  # [baseline, suggested] on the held-out prompts; [] without a suggestion
    stopped: str | None = None  # cancelled / time_limit when cut short (then the points are partial)
    seconds: float = 0.0
    lift_kind: str = "feature"  # feature or token
    computed_at: str = ""  # when it finished (UTC, ISO 8601)
    stored: bool = False  # answered from the store (computed earlier, at computed_at), not run for this request

    @classmethod
    def from_dict(cls, d: dict) -> SweepResult:
        point = lambda p: SweepPoint(**p)  # noqa: E731
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**{
            **known, "baseline": point(d["baseline"]), "points": [point(p) for p in d["points"]],
            "heldout": [point(p) for p in d["heldout"]],
        })  # fmt: skip


Progress = Callable[[SweepProgress], None]


class _Tick(StoppingCriteria):
    def __init__(self, on_token: Callable[[], None], should_stop: ShouldStop) -> None:
        self.on_token, self.should_stop = on_token, should_stop
        self.reason: str | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: object) -> torch.Tensor:
        self.on_token()
        self.reason = self.reason or self.should_stop()
        return torch.full((input_ids.shape[0],), self.reason is not None, dtype=torch.bool, device=input_ids.device)


@dataclass
class _Rows:
    new: list[list[int]]  # generated ids per row, up to and including the first eos
    logprobs: list[torch.Tensor]  # [len_i, vocab] steered next-token log-probs per row


def left_pad(prompts: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    return ids, mask


@torch.inference_mode()
def generate_rows(
    lm: LanguageModel,
    site: Site | int,
    prompts: list[list[int]],
    max_new_tokens: int,
    hook_for: Callable[[int], SteeringHook] | None,
    readers: dict[str, ConditionReader] | None = None,
    on_token: Callable[[], None] = lambda: None,
    should_stop: ShouldStop = lambda: None,
) -> tuple[_Rows, str | None]:
    """Greedy continuations of the rows' prompts in one batched generate (KV cache, left padding);
    `hook_for(padded_prompt_len)` the steering hook (None: unsteered)."""
    eos = lm.eos_token_id
    pad = eos if eos is not None else 0
    ids, mask = left_pad(prompts, pad)
    ids, mask = ids.to(lm.device), mask.to(lm.device)
    gen = HFGenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=pad,
        output_logits=True, return_dict_in_generate=True,
    )  # fmt: skip
    tick = _Tick(on_token, should_stop)
    import contextlib

    with contextlib.ExitStack() as stack:
        for reader in (readers or {}).values():
            stack.enter_context(lm.watch(reader.hook, reader.record))
        if hook_for is not None:
            stack.enter_context(lm.edit(site, hook_for(ids.shape[1])))
        out = lm.model.generate(  # type: ignore[operator]  # transformers types generate loosely
            ids, attention_mask=mask, generation_config=gen, stopping_criteria=StoppingCriteriaList([tick])
        )
    seqs = out.sequences[:, ids.shape[1] :].tolist()
    logits = torch.stack(out.logits, dim=1).float()  # [rows, steps, vocab]
    new, logprobs = [], []
    for i, row in enumerate(seqs):
        n = len(row)
        if eos is not None and eos in row:
            n = row.index(eos) + 1
        new.append(row[:n])
        logprobs.append(torch.log_softmax(logits[i, :n], dim=-1))
    return _Rows(new, logprobs), tick.reason


@torch.inference_mode()
def score_rows(
    lm: LanguageModel, site: Site | int, sae: DictionarySAE, prompts: list[list[int]], rows: _Rows, target_feature: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The unsteered model over prompt + continuation, per row: its next-token log-probs at the generated
    positions [len_i, vocab], and the target feature's activation on the generated tokens [len_i]."""
    eos = lm.eos_token_id
    full = [p + n for p, n in zip(prompts, rows.new)]
    ids, mask = left_pad(full, eos if eos is not None else 0)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    captured: list[torch.Tensor] = []

    hook = f"blocks.{site}.hook_resid_post" if isinstance(site, int) else site.reads_hook
    with lm.watch(hook, lambda a: captured.append(a.clone())):
        logits = lm.model(
            input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device), position_ids=positions.to(lm.device), use_cache=False
        ).logits
    acts = sae.encode(captured[0].float())[..., target_feature]  # [rows, width]
    width = ids.shape[1]
    out = []
    for i, n in enumerate(rows.new):
        k = len(n)
        if k == 0:
            out.append((torch.zeros(0, logits.shape[-1]), torch.zeros(0)))
            continue
        # the generated tokens sit at width-k .. width-1; the logits predicting them at width-k-1 .. width-2
        lp = torch.log_softmax(logits[i, width - k - 1 : width - 1].float(), dim=-1)
        out.append((lp, acts[i, width - k :].float()))
    return out


def _measure(rows: _Rows, scored: list[tuple[torch.Tensor, torch.Tensor]], target_token: int | None) -> tuple[float, float, float]:
    lifts, kls, nlls = [], [], []
    for ids, steered_lp, (plain_lp, acts) in zip(rows.new, rows.logprobs, scored):
        if not ids:
            continue
        tok = torch.tensor(ids)
        p = steered_lp.exp()
        kls.append((p * (steered_lp - plain_lp)).sum(-1))
        nlls.append(-plain_lp.gather(1, tok[:, None])[:, 0])
        lifts.append(p[:, target_token] if target_token is not None else acts)
    cat = lambda xs: float(torch.cat(xs).mean()) if xs else float("nan")  # noqa: E731
    return cat(lifts), cat(kls), cat(nlls)


def run_sweep(
    runtime: SweepRuntime, request: SweepRequest, progress: Progress | None = None, should_stop: ShouldStop = lambda: None
) -> SweepResult:
    """The sweep of `request` on `runtime`'s model (see the module's doc)."""
    start = time.monotonic()
    held = runtime.sae(request.sae)
    lm, sae = runtime.model(held.run.model), held.loaded.sae
    cfg = runtime.cfg
    if not 1 <= len(request.strengths) <= MAX_STRENGTHS:
        raise LiveError(f"a sweep takes 1 to {MAX_STRENGTHS} strengths")
    if not 1 <= request.max_new_tokens <= cfg.max_new_tokens_limit:
        raise LiveError(f"max_new_tokens must be between 1 and {cfg.max_new_tokens_limit}")
    if request.batch_rows < 1:
        raise LiveError("batch_rows must be at least 1")
    prompts_text = list(request.prompts) if request.prompts is not None else BUILTIN_PROMPTS
    heldout_text = list(request.heldout) if request.heldout is not None else HELDOUT_PROMPTS
    if not 1 <= len(prompts_text) <= MAX_PROMPTS or len(heldout_text) > MAX_PROMPTS:
        raise LiveError(f"a sweep takes 1 to {MAX_PROMPTS} prompts (and at most {MAX_PROMPTS} held out)")
    steps = [request.intervention.with_value(s) for s in request.strengths]
    readers, same = runtime.condition_saes(held, [request.intervention])
    for step in steps:  # each strength is its own run: the per-request cap on interventions counts one
        runtime.check(held, [step], readers, same)
    target = request.target_feature if request.target_feature is not None else request.intervention.feature
    if not 0 <= target < sae.cfg.n_latents:
        raise LiveError(f"target feature {target} does not exist: {request.sae} has features 0..{sae.cfg.n_latents - 1}")
    target_token = None
    if request.target_token:
        toks = lm.tokenizer(request.target_token, add_special_tokens=False)["input_ids"]
        if not toks:
            raise LiveError("the target token has no tokens")
        target_token = int(toks[0])

    def tokenize(text: str) -> list[int]:
        ids = runtime._tokenize(lm, text, "prompt")
        return ids[max(0, len(ids) - cfg.max_prompt_tokens) :]

    prompts = [tokenize(p) for p in prompts_text]
    heldout = [tokenize(p) for p in heldout_text]
    n_sweep = len(prompts) * (len(steps) + 1)
    total = request.max_new_tokens * (n_sweep + 2 * len(heldout))
    done = [0]
    stage = ["baseline"]

    def on_token_for(rows: int) -> Callable[[], None]:
        def tick() -> None:
            done[0] += rows
            if progress is not None:
                progress(SweepProgress(stage[0], min(done[0], total), total))

        return tick

    stopped: str | None = None

    def run(prompt_ids: list[list[int]], values: list[float | None]) -> list[SweepPoint]:
        """Points for each value over the prompts (None: unsteered), in chunks of batch_rows rows."""
        nonlocal stopped
        rows_of = [(v, p) for v in values for p in range(len(prompt_ids))]
        new: list[list[int]] = []
        lps: list[torch.Tensor] = []
        scored: list[tuple[torch.Tensor, torch.Tensor]] = []
        steered_value = values[0] is not None
        assert all((v is not None) == steered_value for v in values), "a chunk is all steered or all unsteered"
        for c in range(0, len(rows_of), request.batch_rows):
            chunk = rows_of[c : c + request.batch_rows]
            chunk_prompts = [prompt_ids[p] for _, p in chunk]
            hook_for = None
            if steered_value:
                row_values = torch.tensor([[float(v)] for v, _ in chunk])  # type: ignore[arg-type]  # steered chunks have values
                hook_for = lambda plen, rv=row_values: SteeringHook(sae, [request.intervention], plen, readers, same, rv)  # noqa: E731
            rows, reason = generate_rows(
                lm, held.site, chunk_prompts, request.max_new_tokens, hook_for, readers, on_token_for(len(chunk)), should_stop
            )
            stopped = stopped or reason
            new += rows.new
            lps += rows.logprobs
            scored += score_rows(lm, held.site, sae, chunk_prompts, rows, target)
        points = []
        n = len(prompt_ids)
        for k, v in enumerate(values):
            part = _Rows(new[k * n : (k + 1) * n], lps[k * n : (k + 1) * n])
            lift, kl, flu = _measure(part, scored[k * n : (k + 1) * n], target_token)
            texts = [lm.tokenizer.decode(ids, skip_special_tokens=True) for ids in part.new]
            points.append(SweepPoint(v, lift, kl, flu, texts, part.new))
        return points

    (baseline,) = run(prompts, [None])
    stage[0] = "sweep"
    points = run(prompts, list(request.strengths))
    suggested = suggest(baseline, points, request.max_cost_increase)
    checked: list[SweepPoint] = []
    if suggested is not None and heldout and stopped is None:
        stage[0] = "heldout"
        checked = run(heldout, [None]) + run(heldout, [suggested])
    return SweepResult(
        request.sae, held.run.run_id, request.key(), request.canonical(), prompts_text, baseline, points, suggested,
        heldout_text, checked, stopped, time.monotonic() - start, "token" if target_token is not None else "feature",
        datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )  # fmt: skip


def suggest(baseline: SweepPoint, points: list[SweepPoint], max_cost_increase: float) -> float | None:
    """The strength of highest lift among those costing at most `max_cost_increase` nats per token more
    fluency loss than the baseline, and lifting above it; None when none does (ties: the weaker strength)."""
    ok = [p for p in points if p.fluency <= baseline.fluency + max_cost_increase and p.lift > baseline.lift]
    if not ok:
        return None
    best = max(ok, key=lambda p: (p.lift, -abs(p.strength or 0.0)))
    return best.strength


def sweep_permalink(request: SweepRequest) -> str:
    """The sweep page's URL for this request: all of it in the query, each prompt verbatim, and `key` (the
    digest the stored result is found by). Faithful: the page rebuilds the same request (the same key) from
    it; an explicitly empty held-out set is `no_heldout=1` (no `heldout` at all means the built-in ones)."""
    r = request
    query: list[tuple[str, object]] = [("intervention", r.intervention.spec())]
    query += [("strength", number(s)) for s in r.strengths]
    query += [("prompt", p) for p in r.prompts or ()]
    query += [("heldout", p) for p in r.heldout or ()]
    if r.heldout is not None and not r.heldout:
        query.append(("no_heldout", 1))
    if r.target_feature is not None:
        query.append(("target_feature", r.target_feature))
    if r.target_token:
        query.append(("target_token", r.target_token))
    query += [("max_new_tokens", r.max_new_tokens), ("max_cost_increase", number(r.max_cost_increase)), ("key", r.key())]
    return f"/saes/{quote(r.sae, safe='')}/sweep?{urlencode(query)}"
