"""The live features on the web (the model runs in sae_core/live): a text's features and steering.

gateway.py  where the model is (LiveLink, Gateway) and the work the API and pages share
schemas.py  the API's request and response models and error responses
api.py      /api/v1/saes/{sae}/activations, /api/v1/steer, /api/v1/chat, /api/v1/sweep (each with /stream),
            /api/v1/sweeps/{key} (a stored sweep, from the store alone), /api/v1/live
pages.py    the inference, steering, chat and sweep pages, the feature page's "try it" box, /live/status
graphs.py   attribution graphs built by the model process: POST /api/v1/trace (and /stream), the /graphs page's form
"""

from __future__ import annotations

from fastapi import FastAPI

from . import api, graphs, pages
from .gateway import OFF_HERE, Gateway, LiveLink, lifespan

__all__ = ["OFF_HERE", "Gateway", "LiveLink", "install", "lifespan"]


def install(app: FastAPI, db_url: str, link: LiveLink) -> None:
    """Attach the gateway (app.state.live), the API endpoints with this server's caps, the pages, and
    the mapping of live errors to statuses (503 with Retry-After when it will pass)."""
    app.state.live = Gateway.connect(db_url, link)
    app.include_router(api.limited_router(link.limits))
    app.include_router(api.router)
    app.include_router(pages.router)
    app.include_router(graphs.router)
    api.add_error_handler(app)
