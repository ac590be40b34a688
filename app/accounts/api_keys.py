"""Personal API keys: `ssk_` + 43 url-safe characters (256 random bits), shown once, kept as SHA-256.

Why a plain SHA-256 and not argon2 as for passwords: a slow, salted hash protects secrets a person chose,
which an attacker with the table could guess; a 256-bit random key cannot be guessed, so a stolen table
of digests gives nothing a slow hash would protect further. A fast digest lets the server find a key by
its digest (an indexed lookup on every API request) instead of running a deliberately slow function per
request. The digest is compared inside the database by equality of the whole value.
"""

from __future__ import annotations

import hashlib
import secrets

PREFIX = "ssk_"
SHOWN = 10  # characters kept in clear (with the prefix) to tell keys apart in lists


def new_key() -> tuple[str, str, str]:
    """(the key, to show once; its digest, to store; its display prefix)."""
    key = PREFIX + secrets.token_urlsafe(32)
    return key, digest(key), key[:SHOWN]


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def looks_like_key(token: str) -> bool:
    return token.startswith(PREFIX) and 20 <= len(token) <= 100
