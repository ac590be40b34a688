"""Serve the atlas: what `saescope serve` and the last stage of `saescope demo` both call.

A plain function over a typed config, so every caller passes real values (the demo once called the
typer-decorated command directly and crashed on its unfilled option objects). The ServeConfig is
resolved once, into the AppConfig (app/config.py) that every uvicorn worker builds its app from:
the store's URL (--db, else $SAESCOPE_DATABASE_URL, else the SQLite file in the data directory),
the read threads, the response cache's size and where the one model process listens.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Callable

from sae_core.config import ServeConfig
from sae_core.errors import SaescopeError
from sae_core.live.pool import ModelPool
from sae_core.store import db as store_db

from .config import AppConfig
from .live import LiveLink
from .main import create_app
from .server import run

log = logging.getLogger("saescope.serve")
Say = Callable[[str], object]


def serve(cfg: ServeConfig, say: Say | None = None) -> None:
    """Check the store, then serve pages and API until interrupted (Ctrl-C ends it cleanly). `say`
    prints progress for a person (the CLI passes its console's print); without it, the log says it."""
    say = say or log.warning
    if not 0 < cfg.port < 65536:
        raise SaescopeError(f"--port must be between 1 and 65535, not {cfg.port}")
    if cfg.workers < 1:
        raise SaescopeError(f"--workers must be at least 1, not {cfg.workers}")
    url = store_db.database_url(cfg.db)  # resolved here, once: the workers get this value
    _wait_for_store(url, cfg, say)
    config = AppConfig.resolve(url, db_threads=cfg.db_threads, response_cache_mb=cfg.response_cache_mb, auth=cfg.auth_options)
    # check the store and its schema before binding the port: a clear error, not a crash loop (and with --auth,
    # the session key is made here, once, before the workers read it)
    create_app(config=config)
    address = f"http://{cfg.host}:{cfg.port}"
    say(f"serving {store_db.redact(url)} at {address}  (API docs: {address}/docs; Ctrl-C stops)")
    pool, live = _start_live(url, cfg, say)
    try:
        run(replace(config, live=live), cfg.host, cfg.port, cfg.workers, cfg.loop)
    finally:
        if pool is not None:
            pool.stop()
    say("stopped")


def _wait_for_store(url: str, cfg: ServeConfig, say: Say) -> None:
    """Connect (retrying for --wait-for-db seconds) and, with --upgrade, bring the schema up to date."""
    deadline = time.monotonic() + cfg.wait_for_db
    while True:
        try:
            engine = store_db.make_engine(url)
            break
        except SaescopeError as exc:
            if time.monotonic() >= deadline:
                raise
            say(f"waiting for the database: {exc}")
            time.sleep(2)
    if cfg.upgrade:
        store_db.upgrade(engine)
    engine.dispose()


def _start_live(url: str, cfg: ServeConfig, say: Say) -> tuple[ModelPool | None, LiveLink]:
    """The one model process of this server (sae_core/live/pool.py), whatever the number of workers, and
    the link the workers reach it by (or why there is none)."""
    if not cfg.live:
        return None, LiveLink.none("this server was started with --no-live", cfg.live_options)
    pool = ModelPool(url, cfg.live_options).start()
    say(f"live features: one model process ({cfg.live_options.live_threads} threads, queue {cfg.live_options.live_queue})")
    return pool, LiveLink(cfg.live_options, socket=pool.socket)
