"""What a live request can fail with, and the HTTP status each maps to (app/live.py)."""

from __future__ import annotations

from ..errors import SaescopeError


class LiveError(SaescopeError):
    """Invalid input for the live model (HTTP 422); the message says what to change."""

    status = 422
    retry_after: float | None = None


class NotFound(LiveError):
    """An unknown (or unmined) SAE, or a feature index past its width (HTTP 404)."""

    status = 404


class Unavailable(LiveError):
    """The model cannot answer now: off, loading, failed to load, or too busy (HTTP 503, Retry-After when it will pass)."""

    status = 503

    def __init__(self, detail: str, retry_after: float | None = None):
        super().__init__(detail)
        self.retry_after = retry_after


class Loading(Unavailable):
    """The model process is starting or loading the model (HTTP 503 with Retry-After): it answers in a moment."""
