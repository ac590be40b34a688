"""How a request reads the store: one transaction, hence one read snapshot, on the event loop or in
a worker thread depending on where the database is."""

from __future__ import annotations

import os
import threading
from typing import Callable, TypeVar

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


def db_threads(engine: Engine) -> int:
    """Worker threads for reads: $SAESCOPE_DB_THREADS, else 0 (reads on the event loop) for SQLite
    and for a PostgreSQL server on this machine, else REMOTE_DB_THREADS.

    On the loop, a read is a few hundred microseconds of CPU that holds the GIL anyway, and a local
    server answers in less time than handing the read to a thread costs: on PostgreSQL at 127.0.0.1
    the feature page served 1.8x the requests at half the p99 inline (bench/RESULTS.md, Serving).
    Across a network, though, an inline read would stall every request of the process for a round
    trip, so remote databases get threads."""
    if env := os.environ.get(ENV_DB_THREADS):
        if not env.strip().isdigit():
            raise SaescopeError(f"{ENV_DB_THREADS} must be a whole number of threads (0: reads on the event loop), not {env!r}")
        return int(env)
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


async def read_connection(request: Request, work: Callable[..., T], *args) -> T:
    """`work(connection, *args)` inside one transaction: a page never mixes two mining runs.

    Endpoints are async and hand all their blocking work (queries and template rendering) to one
    call of this (or `read`); see `db_threads` for where it runs."""
    return await run_read(request.app.state.reader, work, *args)


async def run_read(reader: Reader, work: Callable[..., T], *args) -> T:
    """`work(connection, *args)` in one transaction, on the event loop or in a worker thread."""
    if reader.limiter is None:
        for attempt in range(2):
            conn = reader.connection()
            try:
                with conn.begin():
                    return work(conn, *args)
            except DBAPIError as exc:  # the server dropped the long-lived connection (a restart): once more on a new one
                if attempt or not exc.connection_invalidated:
                    raise

    def run() -> T:
        with reader.engine.connect() as conn, conn.begin():
            return work(conn, *args)

    return await anyio.to_thread.run_sync(run, limiter=reader.limiter)


async def read(request: Request, work: Callable[..., T], *args) -> T:
    """`work(session, *args)`: `read_connection` with an ORM Session over the connection (the hot
    paths use read_connection directly: creating the Session cost as much as their one query)."""

    def in_session(conn: Connection) -> T:
        with request.app.state.session_factory(bind=conn) as s:
            return work(s, *args)

    return await read_connection(request, in_session)
