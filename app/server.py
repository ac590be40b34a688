"""Run the app under uvicorn: what `saescope serve` calls (app/serving.py).

This is uvicorn.run's own flow (one process, or uvicorn's supervisor over `workers` processes),
with two fixes to the listening socket that the supervisor hands its workers:

- uvicorn binds it with `proto` left at 0; sockets accepted from it inherit that, and asyncio turns
  TCP_NODELAY on only for sockets that say IPPROTO_TCP. With Nagle's algorithm on, every keep-alive
  response after the first waited for the client's delayed ACK: ~40 ms per request with 2 workers
  (uvicorn issue #3149, open in 0.54).
- On one shared socket, whichever worker wakes first accepts every connection waiting: 32 clients
  that connect at once mostly all land on one worker while the other idles (2 of 3 trials in
  bench/serve_latency.py). On Linux each worker listens on its own SO_REUSEPORT socket instead, and
  the kernel spreads connections across them.
"""

from __future__ import annotations

import gc
import socket
import sys
from typing import TYPE_CHECKING, Callable, Literal

import uvicorn
from uvicorn.main import STARTUP_FAILURE
from uvicorn.supervisors import Multiprocess

if TYPE_CHECKING:
    from starlette.types import ASGIApp

    from .config import AppConfig

PER_WORKER_SOCKETS = sys.platform == "linux"  # elsewhere SO_REUSEPORT does not balance connections


def _tcp_socket(family: int, address: tuple, reuse_port: bool) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(address)
    return sock


class _PerWorkerSocket(socket.socket):
    """The supervisor's bound (never listening) socket. Pickled into a worker process, it arrives
    as that worker's own socket bound to the same address with SO_REUSEPORT."""

    def __reduce__(self) -> tuple[Callable[[int, tuple, bool], socket.socket], tuple[int, tuple, bool]]:
        return _tcp_socket, (self.family, self.getsockname(), True)


class _Config(uvicorn.Config):
    def bind_socket(self) -> socket.socket:
        sock = super().bind_socket()
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            return sock
        if PER_WORKER_SOCKETS and self.workers > 1:
            address = sock.getsockname()
            sock.close()
            first = _tcp_socket(sock.family, address, reuse_port=True)
            return _PerWorkerSocket(first.family, first.type, first.proto, fileno=first.detach())
        # The same descriptor as a socket object that reports IPPROTO_TCP (uvicorn#3149).
        return socket.socket(sock.family, sock.type, socket.IPPROTO_TCP, fileno=sock.detach())


class _AppFactory:
    """What each worker process calls to build its app: `create_app(config=...)` with the server's
    config. Uvicorn pickles it into every worker it spawns, as plain data, so that unpickling it (before
    the worker answers the supervisor's health checks) imports nothing; the app is imported after."""

    def __init__(self, config: AppConfig):
        self.config = config.to_dict()

    def __call__(self) -> ASGIApp:
        from .config import AppConfig
        from .main import create_app

        app = create_app(config=AppConfig.from_dict(self.config))
        # Objects that live as long as the worker (modules, templates, the app; later each vocabulary, see
        # queries.VocabCache) go to the collector's permanent generation: otherwise every full collection
        # walks them: a 70 ms pause every few hundred page requests, stalling every queued request. Only
        # here: a process that builds many apps (tests, embedding) would freeze the garbage of the old ones.
        gc.freeze()
        return app


def run(config: AppConfig, host: str, port: int, workers: int, loop: Literal["asyncio", "uvloop"] = "asyncio") -> None:
    """Serve until interrupted; every worker process builds its app from `config` (_AppFactory)."""
    uv_config = _Config(
        _AppFactory(config),
        factory=True,
        host=host,
        port=port,
        workers=workers,
        loop=loop,
        http="httptools",
        log_level="warning",
        access_log=False,
    )
    server = uvicorn.Server(uv_config)
    try:
        if workers > 1:
            Multiprocess(uv_config, sockets=[uv_config.bind_socket()]).run()
        else:
            server.run()
    except KeyboardInterrupt:
        pass
    if workers == 1 and not server.started:
        raise SystemExit(STARTUP_FAILURE)
