"""Request dependencies shared by the pages and the API."""

from __future__ import annotations

from typing import Iterator

from fastapi import Request
from sqlalchemy.orm import Session


def session(request: Request) -> Iterator[Session]:
    """One Session, one transaction, one snapshot per request: a page never mixes two mining runs."""
    with request.app.state.session_factory() as s, s.begin():
        yield s
