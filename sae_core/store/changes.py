"""Telling readers that what an SAE's pages show has changed.

A server keeps rendered pages and their ETags (app/http.py) and must switch every page of an SAE at
once when a writer changes it: a new mining run, explanations, metrics. Every such write calls
`mark_changed` inside its own transaction, which

- bumps `saes.revision`, which every ETag of the SAE's pages includes, and
- on PostgreSQL, sends a NOTIFY on `CHANNEL`, delivered when the transaction commits, so a server
  listening there knows without querying (app/store_watch.py). SQLite needs nothing more: a reader
  learns of any other connection's commit from `PRAGMA data_version`.
"""

from __future__ import annotations

from sqlalchemy import Connection, text, update
from sqlalchemy.orm import Session

from .schema import SAE

CHANNEL = "saescope_store"


def mark_changed(conn: Connection | Session, sae_id: int) -> None:
    """Within the caller's transaction: the pages of SAE `sae_id` change when it commits."""
    conn.execute(update(SAE).where(SAE.id == sae_id).values(revision=SAE.revision + 1))
    bind = conn.get_bind() if isinstance(conn, Session) else conn
    if bind.dialect.name == "postgresql":
        conn.execute(text(f"NOTIFY {CHANNEL}"))
