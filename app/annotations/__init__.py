"""Annotations and feature lists (issue 31, items 2 and 3), on the accounts of app/accounts.

- An annotation is a label and a Markdown note on one feature of an SAE, keyed by (SAE, feature index),
  not by a mining run: a re-mine keeps it. Every edit appends a revision (author, time, text).
- A feature list is a named, ordered set of features across SAEs with a note per entry; private, shared
  with the team (every signed-in user) or public by link (an unguessable token).

Reading is open where the atlas is (annotations show on the anonymous demo too, read-only); writing needs
accounts on (`saescope serve --auth`) and the editor role (lists: any signed-in user owns theirs).
"""

from __future__ import annotations

from fastapi import FastAPI

from sae_core.config import AuthConfig


def install(app: FastAPI, config: AuthConfig) -> None:
    """The read routes always (annotations show on the anonymous atlas; a list shared by link opens for
    anyone), the write routes and the signed-in pages with accounts on. Before pages.router, whose
    /{sae}/{index} would catch /lists/{id}."""
    from . import routes

    app.include_router(routes.read_api)
    app.include_router(routes.read_pages)
    if config.auth:
        app.include_router(routes.write_api)
        app.include_router(routes.write_pages)
