"""What a continuation is, shared by the runtime (runtime.py) and the generation paths beside it
(frozen.py's frozen attention, sweep.py's batched sweeps), so that they need not import the runtime."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

ShouldStop = Callable[[], str | None]  # a reason to stop now ("cancelled", "time_limit"), or None
MIN_SAMPLING_TEMPERATURE = 1e-6


@dataclass
class Continuation:
    token_ids: list[int]
    tokens: list[str]
    text: str
    stopped: str  # eos, length, time_limit or cancelled


def token_texts(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> list[str]:
    """Each token decoded on its own, as the store's vocabulary holds them (store/write.token_strings)."""
    return [t.replace("\x00", "\u2400") for t in tokenizer.batch_decode([[i] for i in ids], clean_up_tokenization_spaces=False)]
