"""Steering with frozen attention: the steered run keeps the unsteered run's attention patterns.

Neuronpedia's users asked to see a steering effect with and without its effect on where the model
attends (their issue #147). Here, at every step two forwards read the same tokens (the steered
continuation so far), each with its own KV cache:
    1. the unsteered model, whose attention layers record their attention probabilities;
    2. the steered model (the steering hook on), whose attention layers use those probabilities in place
       of their own softmax(QK^T): queries and keys of the steered residual play no part, the values (and
       everything outside attention) are the steered run's own.
The next token comes from the steered forward's logits (greedy, or sampled with the settings' seed).
An empty intervention gives the unsteered continuation (the patterns replayed are the ones it computes).

The attention is swapped through transformers' attention interface: within the run the model uses the
eager implementation, whose function (ALL_ATTENTION_FUNCTIONS["eager"]) is ours; restored afterwards.
Eager attention of the Llama family (Llama, Mistral, Qwen2, SmolLM: grouped keys and values repeated).
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch
from transformers import DynamicCache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import eager_attention_forward, repeat_kv

if TYPE_CHECKING:
    from ..config import GenerationConfig
    from ..model import LanguageModel, Site
    from .generation import Continuation, ShouldStop
    from .interventions import ConditionReader, SteeringHook


class AttentionPatterns:
    """mode "record": eager attention, its probabilities kept per layer; "replay": the kept ones used."""

    def __init__(self) -> None:
        self.mode = "record"
        self.weights: dict[int, torch.Tensor] = {}

    def __call__(
        self,
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float,
        dropout: float = 0.0,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        layer = int(module.layer_idx)  # type: ignore[arg-type]  # transformers attention modules carry their index
        if self.mode == "record":
            out, weights = eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
            self.weights[layer] = weights
            return out, weights
        weights = self.weights[layer]
        values = repeat_kv(value, module.num_key_value_groups)  # type: ignore[arg-type]
        out = torch.matmul(weights.to(values.dtype), values).transpose(1, 2).contiguous()
        return out, weights


@contextlib.contextmanager
def patterns_swapped(lm: LanguageModel) -> Iterator[AttentionPatterns]:
    patterns = AttentionPatterns()
    config = lm.model.config
    saved_impl = config._attn_implementation
    had = "eager" in ALL_ATTENTION_FUNCTIONS._local_mapping
    saved_fn = ALL_ATTENTION_FUNCTIONS._local_mapping.get("eager")
    ALL_ATTENTION_FUNCTIONS._local_mapping["eager"] = patterns
    config._attn_implementation = "eager"
    try:
        yield patterns
    finally:
        config._attn_implementation = saved_impl
        if had:
            ALL_ATTENTION_FUNCTIONS._local_mapping["eager"] = saved_fn
        else:
            del ALL_ATTENTION_FUNCTIONS._local_mapping["eager"]


def _pick(logits: torch.Tensor, settings: GenerationConfig, generator: torch.Generator | None) -> int:
    if generator is None:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / settings.temperature, dim=-1)
    if settings.top_p < 1:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < settings.top_p  # the smallest set reaching top_p
        keep[0] = True  # the likeliest token always (as transformers' top-p keeps one): a top_p below float32's tiny kept none
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.inference_mode()
def frozen_continuation(
    lm: LanguageModel,
    ids: list[int],
    settings: GenerationConfig,
    hook: SteeringHook,
    site: Site | int,
    readers: dict[str, ConditionReader] | None = None,
    should_stop: ShouldStop = lambda: None,
    on_token: Callable[[int], None] | None = None,
) -> Continuation:
    """The steered continuation of `ids` with the unsteered model's attention patterns (see the module)."""
    from .generation import MIN_SAMPLING_TEMPERATURE, Continuation, token_texts

    eos = lm.eos_token_id
    generator = None
    if settings.temperature >= MIN_SAMPLING_TEMPERATURE:
        generator = torch.Generator(device=lm.device).manual_seed(settings.seed)
    plain_cache, steered_cache = DynamicCache(), DynamicCache()
    current = torch.tensor([ids], device=lm.device)
    new: list[int] = []
    reason = "length"
    with patterns_swapped(lm) as patterns:
        for _ in range(settings.max_new_tokens):
            patterns.mode = "record"
            lm.model(input_ids=current, cache=plain_cache, use_cache=True)
            patterns.mode = "replay"
            with contextlib.ExitStack() as stack:
                for reader in (readers or {}).values():
                    stack.enter_context(lm.watch(reader.hook, reader.record))
                stack.enter_context(lm.edit(site, hook))
                logits = lm.model(input_ids=current, cache=steered_cache, use_cache=True).logits[0, -1]
            token = _pick(logits, settings, generator)
            new.append(token)
            if on_token is not None:
                on_token(token)
            if eos is not None and token == eos:
                reason = "eos"
                break
            stop = should_stop()
            if stop:
                reason = stop
                break
            current = torch.tensor([[token]], device=lm.device)
    return Continuation(new, token_texts(lm.tokenizer, new), lm.tokenizer.decode(new, skip_special_tokens=True), reason)
