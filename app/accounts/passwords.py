"""Password hashing: argon2id through argon2-cffi (its RFC 9106 low-memory profile: 64 MiB, 3 passes),
never a hand-written hash. Verification runs in a worker thread (~50 ms of CPU) so sign-ins do not stall pages."""

from __future__ import annotations

import anyio
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

HASHER = PasswordHasher()
MIN_LENGTH = 10
# Verified when the username is unknown, so that a wrong name takes as long as a wrong password.
_DUMMY = HASHER.hash("no user has this password")


def hash_password(password: str) -> str:
    check_strength(password)
    return HASHER.hash(password)


def check_strength(password: str) -> None:
    if len(password) < MIN_LENGTH:
        raise ValueError(f"a password needs at least {MIN_LENGTH} characters")


def verify(stored: str | None, password: str) -> bool:
    try:
        return HASHER.verify(stored or _DUMMY, password) and stored is not None
    except (VerificationError, InvalidHashError):
        return False


def needs_rehash(stored: str) -> bool:
    return HASHER.check_needs_rehash(stored)


async def verify_async(stored: str | None, password: str) -> bool:
    return await anyio.to_thread.run_sync(verify, stored, password)
