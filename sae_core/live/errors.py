"""What a live request can fail with, and the HTTP status each maps to (app/live/). NotFound (404) is
sae_core.errors.NotFound, the one class the store's readers raise too."""

from __future__ import annotations

from ..errors import NotFound, SaescopeError

__all__ = ["LiveError", "Loading", "NotFound", "Unavailable"]


class LiveError(SaescopeError):
    """Invalid input for the live model (HTTP 422); the message says what to change."""

    status = 422
    retry_after: float | None = None


class Unavailable(LiveError):
    """The model cannot answer now: off, loading, failed to load, or too busy (HTTP 503, Retry-After when it will pass)."""

    status = 503

    def __init__(self, detail: str, retry_after: float | None = None):
        super().__init__(detail)
        self.retry_after = retry_after


class Loading(Unavailable):
    """The model process is starting or loading the model (HTTP 503 with Retry-After): it answers in a moment."""
