"""The one way the app reads the store: `work(connection, *args)` in one transaction, hence one read
snapshot, on the event loop or in a worker thread depending on where the database is (db_threads).

Requests call `read_connection(request, work, ...)`; what runs outside a request (the ETags' run
watch, app/store_watch.py; search's start-up warm-up, app/meaning_search.py) calls the app's Reader.
The work is a plain function of a SQLAlchemy Connection: Core statements, rows (app/queries.py), and
for the hottest ones statements run on the driver (app/prepared.py). No ORM Session: creating one per
request cost as much as the hot paths' one query."""

from __future__ import annotations

import os
import threading
from typing import Any, Callable, TypeVar

import anyio
from fastapi import Request
from sqlalchemy import Connection, Engine
from sqlalchemy.exc import DBAPIError

from sae_core.errors import SaescopeError

T = TypeVar("T")

ENV_DB_THREADS = "SAESCOPE_DB_THREADS"
# Threads that may wait on a remote database at once per server process. anyio's default of 40 let
# 32 concurrent page requests fight over the GIL: 2.3x slower than 4 threads in bench/serve_latency.py.
REMOTE_DB_THREADS = 4
_LOCAL_HOSTS = {None, "", "localhost", "127.0.0.1", "::1"}


def threads_from_env() -> int | None:
    """$SAESCOPE_DB_THREADS as a number, or None when unset (app/config.py reads it)."""
    env = os.environ.get(ENV_DB_THREADS)
    if not env:
        return None
    if not env.strip().isdigit():
        raise SaescopeError(f"{ENV_DB_THREADS} must be a whole number of threads (0: reads on the event loop), not {env!r}")
    return int(env)


def db_threads(engine: Engine, threads: int | None = None) -> int:
    """Worker threads for reads: `threads`, else $SAESCOPE_DB_THREADS, else 0 (reads on the event loop)
    for SQLite and for a PostgreSQL server on this machine, else REMOTE_DB_THREADS.

    On the loop, a read is a few hundred microseconds of CPU that holds the GIL anyway, and a local
    server answers in less time than handing the read to a thread costs: on PostgreSQL at 127.0.0.1
    the feature page served 1.8x the requests at half the p99 inline (bench/RESULTS.md, Serving).
    Across a network, though, an inline read would stall every request of the process for a round
    trip, so remote databases get threads."""
    if threads is None:
        threads = threads_from_env()
    if threads is not None:
        return threads
    url = engine.url
    local = url.get_backend_name() == "sqlite" or url.host in _LOCAL_HOSTS or (url.host or "").startswith("/")
    return 0 if local else REMOTE_DB_THREADS


class Reader:
    """Where reads run, set up once per app (app.state.reader)."""

    def __init__(self, engine: Engine, threads: int):
        self.engine = engine
        self.limiter = anyio.CapacityLimiter(threads) if threads > 0 else None
        self._local = threading.local()

    def connection(self) -> Connection:
        """This thread's long-lived connection, for reads on the event loop. Requests on the loop run
        one at a time, so one connection serves them all; checking one out of the pool and back per
        request cost more than the SQLite reads themselves."""
        conn = getattr(self._local, "conn", None)
        if conn is None or conn.closed or conn.invalidated:
            conn = self._local.conn = self.engine.connect()
        return conn

    def close(self) -> None:
        """Returns this thread's long-lived connection and closes the engine's pool: an app that has
        stopped holds no database connection (a test process builds hundreds of apps)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
        self.engine.dispose()

    async def read(self, work: Callable[..., T], *args: Any) -> T:
        """`work(connection, *args)` in one transaction, on the event loop or in a worker thread."""
        if self.limiter is None:
            for attempt in range(2):
                conn = self.connection()
                try:
                    with conn.begin():
                        return work(conn, *args)
                except DBAPIError as exc:  # the server dropped the long-lived connection (a restart): once more on a new one
                    if attempt or not exc.connection_invalidated:
                        raise
        return await anyio.to_thread.run_sync(self.read_blocking, work, *args, limiter=self.limiter)

    def read_blocking(self, work: Callable[..., T], *args: Any) -> T:
        """`work(connection, *args)` in one transaction on a pooled connection, in the calling thread
        (a worker thread, or a background thread of the app's own)."""
        with self.engine.connect() as conn, conn.begin():
            return work(conn, *args)


async def read_connection(request: Request, work: Callable[..., T], *args: Any) -> T:
    """`work(connection, *args)` inside one transaction: a page never mixes two mining runs.

    Endpoints are async and hand all their blocking work (queries and template rendering) to one
    call of this; see `db_threads` for where it runs."""
    return await request.app.state.reader.read(work, *args)
