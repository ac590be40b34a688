"""What one server process needs, resolved once: the store's URL, where its reads run, the response
cache's size, and where the live model is.

`saescope serve` (app/serving.py) resolves it from its ServeConfig and hands the same value to every
uvicorn worker, which builds its app with `create_app(config=...)`; an app built directly
(`create_app(url)`: tests, embedding) resolves it from the arguments and the user-facing environment
variables ($SAESCOPE_DATABASE_URL, $SAESCOPE_DB_THREADS, $SAESCOPE_RESPONSE_CACHE_MB), read here alone.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from sae_core.config import AuthConfig, LiveConfig
from sae_core.store import db

from .deps import threads_from_env
from .live.gateway import LiveLink
from .response_cache import cache_mb_from_env


@dataclass(frozen=True)
class AppConfig:
    db_url: str  # resolved: never None, never the environment's name for it
    db_threads: int | None = None  # threads per process for reads (0: on the event loop); None: by where the database is
    response_cache_mb: int = 64  # 0: no cache
    live: LiveLink = field(default_factory=LiveLink.none)
    auth: AuthConfig = field(default_factory=AuthConfig)  # accounts (off by default) and the model's fair-use limits

    @classmethod
    def resolve(
        cls,
        url: str | None = None,
        *,
        db_threads: int | None = None,
        response_cache_mb: int | None = None,
        live: LiveLink | LiveConfig | None = None,
        auth: AuthConfig | None = None,
    ) -> AppConfig:
        """The arguments, else the environment, else the defaults. A LiveConfig for `live` means: this app
        starts its own model process with these limits (no `saescope serve` around it)."""
        if isinstance(live, LiveConfig):
            live = LiveLink(live, own=True)
        return cls(
            db_url=db.database_url(url),
            db_threads=db_threads if db_threads is not None else threads_from_env(),
            response_cache_mb=response_cache_mb if response_cache_mb is not None else cache_mb_from_env(),
            live=live or LiveLink.none(),
            auth=auth or AuthConfig(),
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain data (what a worker process is handed: unpickling it imports nothing)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AppConfig:
        live = dict(data["live"])
        auth = AuthConfig(**data.get("auth", {}))
        return cls(**{**data, "live": LiveLink(**{**live, "limits": LiveConfig(**live["limits"])}), "auth": auth})
