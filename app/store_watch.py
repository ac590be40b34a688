"""What ETags are made of, kept in the server process: each SAE's live run and revision.

Every store read's ETag depends on the SAE's live run and revision (app/http.py). Reading them from
the store on every request was most of what a cached page or a 304 cost, so a server keeps them and
re-reads them only when the store may have changed since:

- SQLite: `PRAGMA data_version` on the server's connection changes whenever another connection has
  committed; asking costs microseconds and no query. Exact: a commit is seen by the next request.
- PostgreSQL: every write that changes pages sends a NOTIFY (sae_core/store/changes.py); a thread
  per server process LISTENs and counts them. A change is seen as soon as its notification arrives
  (about a millisecond after the commit on a local server). While the listening connection is down
  (a database restart) every request reads the runs, as before, until it is back.
- Anything else (reads in worker threads, other databases): read on every request.
"""

from __future__ import annotations

import logging
import threading
from datetime import datetime

from sqlalchemy import Connection, Engine, select

from sae_core.store.changes import CHANNEL
from sae_core.store.schema import SAE, MiningRun

from .deps import Reader

log = logging.getLogger("saescope.serve")
RunRow = tuple[str, int | None, datetime | None, int]  # name, live run, its finish time, revision
RECONNECT_S = 1.0


def read_runs(conn: Connection) -> dict[str, RunRow]:
    stmt = select(SAE.name, SAE.active_run_id, MiningRun.finished_at, SAE.revision).outerjoin(MiningRun, SAE.active_run_id == MiningRun.id)
    return {row[0]: (row[0], row[1], row[2], row[3]) for row in conn.execute(stmt)}


class _Listener(threading.Thread):
    """LISTENs on the store's change channel; `generation` moves on every notification and every
    (re)connection (notifications sent while disconnected are lost, so a reconnection counts as one)."""

    def __init__(self, engine: Engine):
        super().__init__(name="saescope-store-listener", daemon=True)
        self.conninfo = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        self.generation = 0
        self.connected = False
        self.stopping = threading.Event()

    def run(self) -> None:
        import psycopg

        while not self.stopping.is_set():
            try:
                with psycopg.connect(self.conninfo, autocommit=True) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    self.generation += 1
                    self.connected = True
                    while not self.stopping.is_set():
                        for _ in conn.notifies(timeout=RECONNECT_S):
                            self.generation += 1
            except psycopg.Error as exc:
                if self.connected:
                    log.warning("lost the store's change notifications (%s); reading runs per request until back", exc)
            finally:
                self.connected = False
            self.stopping.wait(RECONNECT_S)


class StoreWatch:
    """`await runs(sae_name)`: the rows ETags are made of, read from the store only when it changed."""

    def __init__(self, reader: Reader):
        self.reader = reader
        self.reads = 0  # store reads made (tests and the benchmark look at it)
        self._token: object = None
        self._rows: dict[str, RunRow] = {}
        self._listener: _Listener | None = None
        self._mode = self._pick_mode(reader)

    @staticmethod
    def _pick_mode(reader: Reader) -> str:
        dialect = reader.engine.dialect.name
        if dialect == "sqlite" and reader.limiter is None:
            return "sqlite"  # reads on the event loop, all on one long-lived connection
        if dialect == "postgresql" and reader.engine.dialect.driver == "psycopg":
            return "postgresql"
        return "always"

    def _change_token(self) -> object:
        """A value that differs whenever the store may have changed since it was last taken; None: unknown."""
        if self._mode == "sqlite":
            conn = self.reader.connection().connection.driver_connection
            assert conn is not None  # a live connection from the pool
            return (id(conn), conn.execute("PRAGMA data_version").fetchone()[0])
        if self._mode == "postgresql":
            if self._listener is None:  # started on first use: each server worker process gets its own
                self._listener = _Listener(self.reader.engine)
                self._listener.start()
            return self._listener.generation if self._listener.connected else None
        return None

    async def runs(self, sae_name: str | None) -> list[RunRow]:
        """The SAE's row (or every SAE's, sorted, for pages that list them all; [] for an unknown SAE)."""
        token = self._change_token()  # taken before the read: a change during it makes the next request read again
        if token is None or token != self._token:
            self._rows = await self.reader.read(read_runs)
            self._token = token
            self.reads += 1
        if sae_name is not None:
            row = self._rows.get(sae_name)
            return [row] if row is not None else []
        return [self._rows[name] for name in sorted(self._rows)]

    def close(self) -> None:
        """Stops the listening thread and waits for it to hang up its connection."""
        if self._listener is not None:
            self._listener.stopping.set()
            self._listener.join(timeout=2 * RECONNECT_S + 1)
            self._listener = None
