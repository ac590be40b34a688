"""How a request reads the store: one Session, one transaction, hence one read snapshot."""

from __future__ import annotations

from typing import Callable, TypeVar

import anyio
from fastapi import Request

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
    state = request.app.state

    def run() -> T:
        with state.session_factory() as s, s.begin():
            return work(s, *args)

    if state.in_process_db:
        return _run_sqlite(state, work, args)
    return await anyio.to_thread.run_sync(run, limiter=state.db_threads)


def _run_sqlite(state, work: Callable[..., T], args) -> T:
    """One transaction on this thread's long-lived connection. Requests on the event loop run one at a
    time, so one connection per thread serves them all; checking a connection out of the pool and back
    per request cost more than the SQLite reads themselves."""
    conn = getattr(state.sqlite_reader, "conn", None)
    if conn is None or conn.closed or conn.invalidated:
        conn = state.sqlite_reader.conn = state.engine.connect()
    with conn.begin(), state.session_factory(bind=conn) as s:
        return work(s, *args)
