"""Stored strength sweeps (the table is schema.SweepRecord; a sweep is sae_core/live/sweep.py's).

The model process writes a sweep when it finishes whole (LiveRuntime.sweep) and reads it back before running
the same request again; the app reads it for the sweep page and GET /api/v1/sweeps/{key}. A row is keyed by
the request's digest (SweepRequest.key(), the permalink's `key`) and the mining run that answered; the result
is the SweepResult's dict as zlib-compressed JSON (Python's encoder: a NaN lift survives, which PostgreSQL's
json type would refuse). A sweep is greedy decoding, so a second run would give the same result up to
floating-point order; in bfloat16 batched rows can part, which is why the first result is the one kept.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import Connection, Engine, insert, select
from sqlalchemy.exc import IntegrityError

from ..errors import SaescopeError
from .schema import SAE, SweepRecord


@dataclass(frozen=True)
class StoredSweep:
    key: str
    sae: str
    run_id: int
    request: dict[str, Any]  # SweepRequest.canonical()
    result: dict[str, Any]  # SweepResult as a dict (dataclasses.asdict)
    created_at: datetime  # when the sweep finished (UTC)
    live_run_id: int | None = None  # the SAE's live run when read (None: unknown or not mined now)

    @property
    def current(self) -> bool:
        """Whether it was computed on the SAE's live run (after a re-mine an old sweep is not)."""
        return self.live_run_id is None or self.live_run_id == self.run_id


def pack_result(result: dict[str, Any]) -> bytes:
    return zlib.compress(json.dumps(result).encode(), 6)


def unpack_result(blob: bytes) -> dict[str, Any]:
    try:
        return dict(json.loads(zlib.decompress(blob)))
    except (zlib.error, ValueError) as exc:
        raise SaescopeError(f"a stored sweep is not compressed JSON ({exc})") from exc


def save_sweep(engine: Engine, result: dict[str, Any], created_at: datetime | None = None) -> bool:
    """Store a finished sweep (`result`: SweepResult as a dict, with its key, sae, run_id and request). False
    when the same request on the same run is stored already: the first result stays (see the module's doc)."""
    values = {
        "key": result["key"],
        "sae": result["sae"],
        "run_id": int(result["run_id"]),
        "request": result["request"],
        "result": pack_result(result),
        "created_at": created_at or datetime.now(timezone.utc),
    }
    try:
        with engine.begin() as conn:
            found = conn.execute(select(SweepRecord.id).where(SweepRecord.key == values["key"], SweepRecord.run_id == values["run_id"]))
            if found.first() is not None:
                return False
            conn.execute(insert(SweepRecord).values(**values))
    except IntegrityError:  # another writer (the CLI and a server on one store) stored it in between
        return False
    return True


def find_sweep(conn: Connection, key: str, run_id: int | None = None) -> StoredSweep | None:
    """The stored sweep with this key: computed on `run_id`, or (None) on the SAE's live run if there is one,
    else the newest (an old permalink after a re-mine); None when it is not stored."""
    query = select(SweepRecord).where(SweepRecord.key == key)
    if run_id is not None:
        query = query.where(SweepRecord.run_id == run_id)
    rows = list(conn.execute(query.order_by(SweepRecord.created_at.desc(), SweepRecord.id.desc())))
    if not rows:
        return None
    live = conn.execute(select(SAE.active_run_id).where(SAE.name == rows[0].sae)).scalar_one_or_none()
    row = next((r for r in rows if r.run_id == live), rows[0])
    created = row.created_at if row.created_at.tzinfo else row.created_at.replace(tzinfo=timezone.utc)  # SQLite keeps no zone
    return StoredSweep(row.key, row.sae, row.run_id, dict(row.request), unpack_result(row.result), created, live)
