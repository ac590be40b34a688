"""Streamed generation and chat turns, for the model process (pool.py) to send as they come.

TextDeltas turns the token ids of one continuation, as they are generated, into pieces of text whose
concatenation is exactly the continuation's text (`tokenizer.decode(ids, skip_special_tokens=True)`,
what the non-streamed answer holds): each piece is what the decode of all ids so far adds, held back
while it ends in an incomplete UTF-8 character (one character split over two byte-level tokens), and
`flush` sends the rest.

chat_prompt_ids puts a chat turn (system and user messages, earlier turns) through the model's chat
template with the assistant's turn opened (`add_generation_prompt`), as the instruct model was trained.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from .errors import LiveError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

ROLES = ("system", "user", "assistant")
MAX_MESSAGES = 32


class TextDeltas:
    """The text one continuation adds token by token (see the module's doc)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, emit: Callable[[str], None]):
        self.tokenizer, self.emit = tokenizer, emit
        self.ids: list[int] = []
        self.sent = ""

    def _text(self) -> str:
        return str(self.tokenizer.decode(self.ids, skip_special_tokens=True))

    def add(self, token_id: int) -> None:
        self.ids.append(token_id)
        text = self._text()
        if text.endswith("\ufffd") or not text.startswith(self.sent):
            return  # an incomplete character (or a decode that rewrote earlier text): wait for the next token
        if len(text) > len(self.sent):
            self.emit(text[len(self.sent) :])
            self.sent = text

    def flush(self) -> str:
        """Send what is left; the whole text. A decode that rewrote text already sent cannot be taken
        back: the final answer's text then wins (never seen with byte-level BPE; tested for equality)."""
        text = self._text()
        if text.startswith(self.sent) and len(text) > len(self.sent):
            self.emit(text[len(self.sent) :])
        self.sent = text
        return text


def check_messages(messages: list[dict]) -> list[dict[str, str]]:
    """Messages as the chat template takes them; LiveError (422) with the reason otherwise."""
    if not messages:
        raise LiveError("a chat turn needs at least one message")
    if len(messages) > MAX_MESSAGES:
        raise LiveError(f"at most {MAX_MESSAGES} messages per chat turn (got {len(messages)})")
    out = []
    for i, m in enumerate(messages):
        role, content = m.get("role"), m.get("content")
        if role not in ROLES or not isinstance(content, str):
            raise LiveError(f"message {i + 1}: role must be system, user or assistant and content a text")
        out.append({"role": role, "content": content})
    return out


def chat_prompt_ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict], max_tokens: int) -> list[int]:
    """The token ids of `messages` through the model's chat template, the assistant's turn opened.
    LiveError when the model has no chat template. Past `max_tokens` the turn's last `max_tokens` are
    continued, as a long steering prompt is (the answer's prompt_truncated says how many were cut)."""
    checked = check_messages(messages)
    if not getattr(tokenizer, "chat_template", None):
        raise LiveError("this model has no chat template: use steering on a plain prompt")
    raw: Any = tokenizer.apply_chat_template(checked, add_generation_prompt=True, tokenize=True)
    if not isinstance(raw, list):  # transformers 5 answers a BatchEncoding
        raw = raw["input_ids"]
    return [int(i) for i in raw]
