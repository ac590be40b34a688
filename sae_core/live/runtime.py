"""The live runtime: the model loaded once, the store's SAEs on demand, and the two questions it answers.

    encode(sae, text, feature)                      the tokens, each with its strongest features, and
                                                    a chosen feature's activation on every token
    generate(sae, prompt, interventions, settings)  the default and the steered continuation

An SAE is the one its store's visible run was mined with (store/weights.py: the weights stored with the
run, else the SAE folder), re-read when a re-mine switches the run, so live answers always match the
pages. Generation is transformers' own `generate` (KV cache) with the steering hook at the SAE's site
(interventions.SteeringHook; model.Site: an SAE reads and edits its hook, a transcoder reads its layer's MLP
input and edits that MLP's output, as its cfg.json's hook_name_out says); a `should_stop` callback (client
gone, time limit) ends it through a StoppingCriteria. The same prompt, settings and seed give the same tokens for a given model dtype and
machine kind: greedy decoding is deterministic, and sampling seeds torch's generator before each run.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch
from transformers import GenerationConfig as HFGenerationConfig
from transformers import StoppingCriteria, StoppingCriteriaList

from ..config import GenerationConfig, LiveConfig
from ..errors import SaescopeError
from ..model import LanguageModel, Site, load_model
from .errors import LiveError, NotFound, Unavailable
from .generation import MIN_SAMPLING_TEMPERATURE, Continuation, ShouldStop, token_texts
from .interventions import ConditionReader, Intervention, SteeringHook, check_interventions

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from ..circuits.attribution import Progress as AttributionProgress
    from ..circuits.trace import TraceConfig, TraceResult
    from ..interchange import LoadedSAE
    from ..sae.base import DictionarySAE
    from ..store.weights import RunSAE
    from .sweep import Progress, SweepRequest, SweepResult

MAX_TOP_FEATURES = 64
log = logging.getLogger("saescope.live")


@dataclass
class TokenFeatures:
    id: int
    text: str
    features: list[tuple[int, float]]  # (feature, activation), strongest first; empty on skipped positions
    skipped: bool = False  # a leading position the SAE never saw in training (the attention sink)


@dataclass
class EncodeResult:
    sae: str
    run_id: int
    tokens: list[TokenFeatures]
    feature: int | None = None
    feature_acts: list[float] | None = None  # the chosen feature's activation per token (0 on skipped positions)
    truncated: int = 0  # tokens past max_text_tokens, left out: the text's first max_text_tokens were read
    features: list[int] | None = None  # several features asked at once (a feature list's page: one encode per SAE)
    features_acts: list[list[float]] | None = None  # each of `features`' activation per token, in that order


@dataclass
class GenerateResult:
    sae: str
    run_id: int
    prompt_tokens: list[str]
    default: Continuation
    steered: Continuation
    diverges_at: int | None  # first generated position where the two differ; None when identical
    interventions: list[Intervention] = field(default_factory=list)
    settings: GenerationConfig = field(default_factory=GenerationConfig)
    prompt_truncated: int = 0  # tokens cut from the prompt's start: its last max_prompt_tokens were continued
    frozen: Continuation | None = None  # with frozen_attention: the steered run with the unsteered run's attention patterns
    frozen_diverges_at: int | None = None  # first generated position where `frozen` differs from `default`


@dataclass
class _LiveSAE:
    run: RunSAE
    loaded: LoadedSAE
    site: Site  # where its code is read and where its decoder writes
    skip: int  # leading positions per window the SAE was not trained on

    @property
    def layer(self) -> int:
        """The layer whose activation the code reads."""
        return self.site.reads.layer


class _Stop(StoppingCriteria):
    """Asks `should_stop` after every generated token; a reason ends the generation there."""

    def __init__(self, should_stop: ShouldStop, on_token: Callable[[int], None] | None = None):
        self.should_stop = should_stop
        self.on_token = on_token  # told each generated token as it comes (streaming)
        self.reason: str | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        if self.on_token is not None:
            self.on_token(int(input_ids[0, -1]))
        self.reason = self.reason or self.should_stop()
        return torch.full((input_ids.shape[0],), self.reason is not None, dtype=torch.bool, device=input_ids.device)


class LiveRuntime:
    """One model (the store's SAEs' model, loaded on first use or by `preload`) and its SAEs. Not
    thread-safe: the worker pool runs one request at a time."""

    DEFAULTS_CACHED = 64

    def __init__(
        self,
        cfg: LiveConfig,
        engine: Engine | None = None,
        lm: LanguageModel | None = None,
        sae_source: Callable[[str], tuple[RunSAE, LoadedSAE]] | None = None,
    ):
        self.cfg, self.engine, self.lm = cfg, engine, lm
        self._source = sae_source
        self._saes: dict[str, _LiveSAE] = {}
        self._defaults: OrderedDict[tuple, Continuation] = OrderedDict()
        self._graph_lm: LanguageModel | None = None  # a float32 copy of a bf16 live model, for graphs
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ loading

    def _current_run(self, name: str) -> int | None:
        from ..store.weights import live_run

        if self.engine is None:
            return None
        with self.engine.connect() as conn:
            found = live_run(conn, name)
        if found is None:
            raise NotFound(f"no mined SAE named {name!r} in the store")
        return found[0].run_id

    def _load(self, name: str) -> tuple[RunSAE, LoadedSAE]:
        if self._source is not None:
            return self._source(name)
        from ..store.weights import load_run_sae

        assert self.engine is not None, "a LiveRuntime needs a store engine or an sae_source"
        with self.engine.connect() as conn:
            try:
                return load_run_sae(conn, name)
            except SaescopeError as exc:
                raise (NotFound if "no mined SAE" in str(exc) else Unavailable)(str(exc)) from exc

    def sae(self, name: str) -> _LiveSAE:
        """The SAE of the store's visible run (reloaded after a re-mine), with the model it reads loaded."""
        with self._lock:
            held = self._saes.get(name)
            if held is not None and (self.engine is None or self._current_run(name) == held.run.run_id):
                return held
            run, loaded = self._load(name)
            lm = self.model(run.model)
            try:
                site = Site.of(run.hook, loaded.cfg.get("hook_name_out"))  # the SAE's own hooks, whatever its architecture
                lm.check_layer(site.reads.layer)
            except SaescopeError as exc:
                raise Unavailable(f"{name} cannot run live: {exc}") from exc
            if loaded.sae.cfg.d_in != lm.d_model:
                raise Unavailable(f"{name} reads width {loaded.sae.cfg.d_in} but {run.model} has width {lm.d_model}")
            loaded.sae.to(lm.device).eval()
            held = self._saes[name] = _LiveSAE(run, loaded, site, loaded.provenance.skip_positions)
            return held

    def model(self, name: str) -> LanguageModel:
        """The loaded model, loading `name` if none is; one model per runtime (a store of one model's SAEs)."""
        if self.lm is not None and self.lm.name == name:
            return self.lm
        if self.lm is not None:
            raise Unavailable(f"this server's live model is {self.lm.name}; SAEs of {name} cannot run live here")
        try:
            self.lm = load_model(name, self.cfg.live_device, self.cfg.live_model_dtype)
        except SaescopeError as exc:
            raise Unavailable(f"the model {name} could not be loaded: {exc}") from exc
        return self.lm

    def graph_model(self, name: str) -> LanguageModel:
        """The model attribution graphs read, in float32 (bf16 edges would not add up): the live model itself when it
        is float32, else a float32 copy of it kept beside it. One model per runtime, as `model` says."""
        lm = self.model(name)
        if lm.dtype == torch.float32:
            return lm
        if self._graph_lm is None:
            try:
                self._graph_lm = load_model(name, self.cfg.live_device, "float32")
            except SaescopeError as exc:
                raise Unavailable(f"the model {name} could not be loaded in float32 for graphs: {exc}") from exc
        return self._graph_lm

    def trace(self, cfg: TraceConfig, progress: AttributionProgress | None = None) -> TraceResult:
        """A prompt's attribution graph, built and stored by sae_core/circuits/trace.py (as `saescope trace` does) with
        this runtime's model and store, or found stored; its refusals as LiveError (422) with the reason."""
        from ..circuits.trace import trace

        if self.engine is None:
            raise Unavailable("attribution graphs are stored: this live runtime has no store")
        try:
            return trace(cfg, progress=progress, engine=self.engine, load_lm=self.graph_model)
        except (LiveError, NotFound):
            raise
        except SaescopeError as exc:  # a bad prompt, set or setting, or the attribution's own time limit
            raise LiveError(str(exc)) from exc

    def preload(self) -> str | None:
        """Load the model of the store's first mined SAE now rather than on the first request; that SAE's name."""
        from sqlalchemy import select

        from ..store.schema import SAE

        if self.engine is None:
            return None
        with self.engine.connect() as conn:
            first = conn.scalar(select(SAE.name).where(SAE.active_run_id.is_not(None)).order_by(SAE.name).limit(1))
        if first is not None:
            self.sae(first)
        return first

    # ------------------------------------------------------------------ questions

    def _tokenize(self, lm: LanguageModel, text: str, what: str) -> list[int]:
        """All of `text`'s tokens. Past the token caps a text is cut, not refused (see encode and
        generate): the API's schema can state a length in characters, not in tokens, and every request
        it admits is answered."""
        if not text:
            raise LiveError(f"the {what} is empty")
        ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]  # as the corpus windows are tokenized
        if not ids:
            raise LiveError(f"the {what} has no tokens")
        return ids

    @torch.inference_mode()
    def encode(self, sae_name: str, text: str, feature: int | None = None, top: int = 8, features: list[int] | None = None) -> EncodeResult:
        """The text's strongest features per token; with `feature` that feature's activation per token, with
        `features` each of theirs (the same one forward pass and encode for all of them)."""
        held = self.sae(sae_name)
        sae, lm = held.loaded.sae, self.model(held.run.model)
        for f in ([] if feature is None else [feature]) + (features or []):
            if not 0 <= f < sae.cfg.n_latents:
                raise NotFound(f"feature {f} does not exist: {sae_name} has features 0..{sae.cfg.n_latents - 1}")
        if not 1 <= top <= MAX_TOP_FEATURES:
            raise LiveError(f"top must be between 1 and {MAX_TOP_FEATURES}")
        ids = self._tokenize(lm, text, "text")
        truncated = max(0, len(ids) - self.cfg.max_text_tokens)
        ids = ids[: self.cfg.max_text_tokens]  # the text's beginning, as a reader starts
        x = lm.activations(torch.tensor([ids]), held.site.reads_hook)[0].float()
        z = sae.encode(x)  # [seq, n_latents]
        vals, idx = z.topk(min(top, z.shape[-1]), dim=-1)
        texts = token_texts(lm.tokenizer, ids)
        tokens = []
        for pos, (tid, txt) in enumerate(zip(ids, texts)):
            skipped = pos < held.skip
            feats = [] if skipped else [(int(i), float(v)) for v, i in zip(vals[pos].tolist(), idx[pos].tolist()) if v > 0]
            tokens.append(TokenFeatures(tid, txt, feats, skipped))
        acts = None
        if feature is not None:
            acts = [0.0 if pos < held.skip else float(a) for pos, a in enumerate(z[:, feature].tolist())]
        many = None
        if features is not None:
            chosen = z[:, features]  # a copy (advanced indexing)
            chosen[: held.skip] = 0.0  # the skipped positions read 0, as in `feature_acts`
            many = chosen.T.tolist()
        return EncodeResult(sae_name, held.run.run_id, tokens, feature, acts, truncated, features, many)

    def condition_saes(
        self, held: _LiveSAE, interventions: list[Intervention]
    ) -> tuple[dict[str, ConditionReader], dict[str, DictionarySAE]]:
        """The other SAEs the interventions' conditions read: readers at hooks a forward reaches earlier, SAEs
        reading this very hook."""
        wanted: dict[str, list[int]] = {}
        for iv in interventions:
            c = iv.condition
            if c is not None and c.kind == "feature" and c.sae is not None and c.feature is not None:
                wanted.setdefault(c.sae, []).append(c.feature)
        readers: dict[str, ConditionReader] = {}
        same: dict[str, DictionarySAE] = {}
        for name, features in wanted.items():
            other = self.sae(name)
            if other.run.model != held.run.model:
                raise LiveError(f"the condition's SAE {name} reads {other.run.model}, not {held.run.model}")
            if other.site.order > held.site.order:
                raise LiveError(f"the condition's SAE {name} is at a later hook ({other.run.hook}) than {held.run.hook}")
            width = other.loaded.sae.cfg.n_latents
            if any(not 0 <= f < width for f in features):
                raise NotFound(f"the condition's feature does not exist: {name} has features 0..{width - 1}")
            if other.site.order == held.site.order:
                same[name] = other.loaded.sae
            else:
                readers[name] = ConditionReader(other.loaded.sae, other.site.reads_hook, features)
        return readers, same

    def check(
        self, held: _LiveSAE, interventions: list[Intervention], readers: dict[str, ConditionReader], same: dict[str, DictionarySAE]
    ) -> None:
        widths = {name: r.sae.cfg.n_latents for name, r in readers.items()} | {name: s.cfg.n_latents for name, s in same.items()}
        check_interventions(interventions, held.loaded.sae.cfg.n_latents, self.cfg.max_interventions, widths)

    def generate(
        self,
        sae_name: str,
        prompt: str,
        interventions: list[Intervention],
        settings: GenerationConfig,
        should_stop: ShouldStop = lambda: None,
        on_token: Callable[[str, int], None] | None = None,
        prompt_ids: list[int] | None = None,
        frozen_attention: bool = False,
    ) -> GenerateResult:
        """`on_token(which, id)` is told each token as it is generated ("default", then "steered", then
        "frozen"; a cached default is told at once); `prompt_ids` replaces `prompt` (a chat turn through the
        template). With `frozen_attention` also the steered continuation whose attention layers use the
        unsteered model's attention patterns on the same tokens (`frozen`, see frozen.py)."""
        held = self.sae(sae_name)
        lm = self.model(held.run.model)
        readers, same = self.condition_saes(held, interventions)
        self.check(held, interventions, readers, same)
        if not 1 <= settings.max_new_tokens <= self.cfg.max_new_tokens_limit:
            raise LiveError(f"max_new_tokens must be between 1 and {self.cfg.max_new_tokens_limit}")
        if settings.temperature < 0 or not 0 < settings.top_p <= 1:
            raise LiveError("temperature must be >= 0 and top_p in (0, 1]")
        ids = self._tokenize(lm, prompt, "prompt") if prompt_ids is None else list(prompt_ids)
        prompt_truncated = max(0, len(ids) - self.cfg.max_prompt_tokens)
        ids = ids[prompt_truncated:]  # the prompt's end, which the continuation follows
        key = (lm.name, str(lm.dtype), tuple(ids), settings.max_new_tokens, settings.temperature, settings.top_p, settings.seed)
        default = self._defaults.get(key)
        if default is None:
            tell = None if on_token is None else lambda i: on_token("default", i)
            default = self.continue_(lm, ids, settings, None, held.site, should_stop, tell)
            if default.stopped in ("eos", "length"):  # a cut-short run is not the answer to cache
                self._defaults[key] = default
                while len(self._defaults) > self.DEFAULTS_CACHED:
                    self._defaults.popitem(last=False)
        else:
            self._defaults.move_to_end(key)
            if on_token is not None:
                for i in default.token_ids:
                    on_token("default", i)
        hook = SteeringHook(held.loaded.sae, interventions, len(ids), readers, same)
        tell = None if on_token is None else lambda i: on_token("steered", i)
        steered = self.continue_(lm, ids, settings, hook, held.site, should_stop, tell, readers)
        frozen = None
        if frozen_attention:
            from .frozen import frozen_continuation

            hook = SteeringHook(held.loaded.sae, interventions, len(ids), readers, same)
            tell = None if on_token is None else lambda i: on_token("frozen", i)
            frozen = frozen_continuation(lm, ids, settings, hook, held.site, readers, should_stop, tell)
        prompt_tokens = token_texts(lm.tokenizer, ids)
        return GenerateResult(
            sae_name, held.run.run_id, prompt_tokens, default, steered, diverges_at(default, steered), list(interventions), settings,
            prompt_truncated, frozen, diverges_at(default, frozen) if frozen is not None else None,
        )  # fmt: skip

    def sweep(self, request: SweepRequest, progress: Progress | None = None, should_stop: ShouldStop = lambda: None) -> SweepResult:
        """A strength sweep (sweep.run_sweep), stored when it finishes whole, and answered from the store when
        this request was stored on the SAE's current run (no model run then; `stored` says so).

        The write is here, in the process that computed the sweep, rather than in the app after the answer
        arrives: one place serves the API, the page and the CLI (`saescope sweep` prints a permalink that then
        resolves), the result is stored even when its client left after it finished, and the app keeps to
        reading the store. Without a store (an embedded runtime) every request runs."""
        from .sweep import SweepResult, run_sweep

        held = self.sae(request.sae)
        if self.engine is not None:
            from ..store.sweeps import find_sweep

            with self.engine.connect() as conn:
                found = find_sweep(conn, request.key(), held.run.run_id)
            if found is not None:
                return SweepResult.from_dict({**found.result, "stored": True})
        result = run_sweep(self, request, progress, should_stop)
        if result.stopped is None and self.engine is not None:
            from dataclasses import asdict
            from datetime import datetime

            from sqlalchemy.exc import SQLAlchemyError

            from ..store.sweeps import save_sweep

            try:
                save_sweep(self.engine, asdict(result), datetime.fromisoformat(result.computed_at))
            except SQLAlchemyError as exc:  # the answer is computed: it still goes out, only its permalink will rerun it
                log.warning("could not store sweep %s: %s", result.key, exc)
        return result

    @torch.inference_mode()
    def continue_(
        self,
        lm: LanguageModel,
        ids: list[int],
        settings: GenerationConfig,
        hook: SteeringHook | None,
        site: Site | int,
        should_stop: ShouldStop = lambda: None,
        on_token: Callable[[int], None] | None = None,
        readers: dict[str, ConditionReader] | None = None,
    ) -> Continuation:
        """One continuation of `ids` through transformers' generate, with `hook` at `site` (an int: the residual
        after that layer; None: no hook at all)."""
        # Sampling tends to greedy decoding as the temperature falls, and below this logits / temperature
        # overflow to inf (NaN probabilities): such temperatures decode greedily.
        sampling = settings.temperature >= MIN_SAMPLING_TEMPERATURE
        eos = lm.eos_token_id
        gen = HFGenerationConfig(
            max_new_tokens=settings.max_new_tokens,
            do_sample=sampling,
            temperature=settings.temperature if sampling else None,
            top_p=settings.top_p if sampling else None,
            top_k=0 if sampling else None,  # no hidden top-k cut: only what the settings say
            eos_token_id=eos,
            pad_token_id=eos if eos is not None else 0,
        )
        stop = _Stop(should_stop, on_token)
        input_ids = torch.tensor([ids], device=lm.device)
        if sampling:
            torch.manual_seed(settings.seed)
        with contextlib.ExitStack() as stack:
            for reader in (readers or {}).values():  # conditions on SAEs at earlier hooks record there first
                stack.enter_context(lm.watch(reader.hook, reader.record))
            if hook is not None:
                stack.enter_context(lm.edit(site, hook))
            out = lm.model.generate(  # type: ignore[operator]  # transformers types generate loosely
                input_ids, attention_mask=torch.ones_like(input_ids), generation_config=gen, stopping_criteria=StoppingCriteriaList([stop])
            )
        new = out[0, len(ids) :].tolist()
        if stop.reason:
            reason = stop.reason
        elif eos is not None and new and new[-1] == eos:
            reason = "eos"
        else:
            reason = "length"
        return Continuation(new, token_texts(lm.tokenizer, new), lm.tokenizer.decode(new, skip_special_tokens=True), reason)


def diverges_at(a: Continuation, b: Continuation) -> int | None:
    """The first generated position where two continuations differ; None when identical."""
    diverges = next((i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids)) if x != y), None)
    if diverges is None and len(a.token_ids) != len(b.token_ids):
        diverges = min(len(a.token_ids), len(b.token_ids))
    return diverges


def time_limit(seconds: float, cancelled: Callable[[], bool] = lambda: False) -> ShouldStop:
    """A should_stop that says cancelled once `cancelled()` and time_limit after `seconds` from now."""
    deadline = time.monotonic() + seconds

    def check() -> str | None:
        if cancelled():
            return "cancelled"
        return "time_limit" if time.monotonic() > deadline else None

    return check
