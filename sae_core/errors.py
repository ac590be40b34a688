"""User-facing errors: the CLI prints their message as one line instead of a traceback."""


class SaescopeError(Exception):
    """Bad input or an unmet precondition the user can fix; the message says how."""
