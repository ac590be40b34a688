"""Serve the atlas: what `saescope serve` and the last stage of `saescope demo` both call.

A plain function over a typed config, so every caller passes real values (the demo once called the
typer-decorated command directly and crashed on its unfilled option objects). The web app lives in
`app/`; it is imported here only when serving starts, so `sae_core` does not depend on it.
"""

from __future__ import annotations

import os
import time

from rich.console import Console

from .config import ServeConfig
from .errors import SaescopeError


def serve(cfg: ServeConfig, console: Console | None = None) -> None:
    """Check the store, then serve pages and API until interrupted (Ctrl-C ends it cleanly)."""
    from app.deps import ENV_DB_THREADS
    from app.main import create_app
    from app.response_cache import ENV_CACHE_MB
    from app.server import run

    from .store import db as store_db

    console = console or Console(stderr=True)
    if not 0 < cfg.port < 65536:
        raise SaescopeError(f"--port must be between 1 and 65535, not {cfg.port}")
    if cfg.workers < 1:
        raise SaescopeError(f"--workers must be at least 1, not {cfg.workers}")
    deadline = time.monotonic() + cfg.wait_for_db
    while True:
        try:
            engine = store_db.make_engine(cfg.db)
            break
        except SaescopeError as exc:
            if time.monotonic() >= deadline:
                raise
            console.print(f"waiting for the database: {exc}")
            time.sleep(2)
    if cfg.upgrade:
        store_db.upgrade(engine)
    # Each worker process builds its own app: the store's URL, the read threads and the response cache's
    # size reach it through the environment.
    os.environ[store_db.ENV_URL] = store_db.database_url(cfg.db)
    if cfg.db_threads is not None:
        os.environ[ENV_DB_THREADS] = str(cfg.db_threads)
    os.environ[ENV_CACHE_MB] = str(cfg.response_cache_mb)
    create_app(cfg.db)  # check the store and its schema before binding the port: a clear error, not a crash loop
    url = f"http://{cfg.host}:{cfg.port}"
    console.print(f"serving {store_db.redact(store_db.database_url(cfg.db))} at {url}  (API docs: {url}/docs; Ctrl-C stops)")
    pool = _start_live(cfg, console)
    try:
        run(cfg.host, cfg.port, cfg.workers, cfg.loop)
    finally:
        if pool is not None:
            pool.stop()
    console.print("stopped")


def _start_live(cfg: ServeConfig, console: Console):
    """The one model process of this server (sae_core/live/pool.py), whatever the number of workers; the
    workers learn where it listens (or why there is none) from the environment."""
    from app.live import ENV_LIVE, serve_env

    from .live.pool import ModelPool
    from .store import db as store_db

    if not cfg.live:
        os.environ[ENV_LIVE] = serve_env(None, cfg.live_options, off="this server was started with --no-live")
        return None
    pool = ModelPool(store_db.database_url(cfg.db), cfg.live_options).start()
    os.environ[ENV_LIVE] = serve_env(pool.socket, cfg.live_options)
    console.print(f"live features: one model process ({cfg.live_options.live_threads} threads, queue {cfg.live_options.live_queue})")
    return pool
