"""User-facing errors: the CLI prints their message as one line instead of a traceback."""


class SaescopeError(Exception):
    """Bad input or an unmet precondition the user can fix; the message says how."""


class NotFound(SaescopeError, LookupError):
    """An unknown SAE or feature, or an SAE not mined yet (HTTP 404): the store's readers (app/queries.py)
    and the live model (sae_core/live) raise this one class; the message says what was asked for."""

    status = 404
    retry_after: float | None = None
