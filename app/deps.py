"""How a request reads the store: one Session, one transaction, hence one read snapshot."""

from __future__ import annotations

from typing import Callable, TypeVar

import anyio
from fastapi import Request
from sqlalchemy import Connection

T = TypeVar("T")

# Threads that may wait on PostgreSQL at once per server process. anyio's default of 40 let 32
# concurrent page requests fight over the GIL: 2.3x slower than 4 threads in bench/serve_latency.py.
DB_THREADS = 4


async def read(request: Request, work: Callable[..., T], *args) -> T:
    """`work(session, *args)` inside one transaction: a page never mixes two mining runs.

    Endpoints are async and hand all their blocking work (queries and template rendering) to this one
    call. On PostgreSQL it runs in a worker thread, so the event loop serves others while a query waits
    on the network. On SQLite it runs on the event loop itself: the database is in-process, a read is
    ~0.1 ms of CPU that would hold the GIL anyway, and the thread hand-off cost more than the query."""
    def in_session(conn: Connection) -> T:
        with request.app.state.session_factory(bind=conn) as s:
            return work(s, *args)
    return await read_connection(request, in_session)


async def read_connection(request: Request, work: Callable[..., T], *args) -> T:
    """`work(connection, *args)` inside one transaction, without an ORM Session: for the hot paths,
    where creating the Session cost as much as their one query (see `read` for where it runs)."""
    state = request.app.state
    if state.in_process_db:
        conn = _sqlite_connection(state)
        with conn.begin():
            return work(conn, *args)

    def run() -> T:
        with state.engine.connect() as conn, conn.begin():
            return work(conn, *args)
    return await anyio.to_thread.run_sync(run, limiter=state.db_threads)


def _sqlite_connection(state) -> Connection:
    """This thread's long-lived connection. Requests on the event loop run one at a time, so one
    connection per thread serves them all; checking a connection out of the pool and back per request
    cost more than the SQLite reads themselves."""
    conn = getattr(state.sqlite_reader, "conn", None)
    if conn is None or conn.closed or conn.invalidated:
        conn = state.sqlite_reader.conn = state.engine.connect()
    return conn
