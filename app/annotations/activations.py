"""A feature list's activations on its common text, from the live model: batched, cached and metered.

The list page is a GET that anyone holding a shared link may open, again and again. Asking the model once
per entry on every view (up to 500 entries) would let a visitor who is not signed in run it without limit,
past --anonymous read, which is meant to keep them off it. So:

- **Who may.** The page asks the same question as the live POST routes (accounts.middleware.model_quota):
  with accounts on, a visitor not signed in runs the model only under --anonymous live; under read they
  see the list without activations and a note saying why (never activations cached from someone else's
  view: what a visitor sees does not depend on who came before).
- **Batched.** The entries of one SAE are one model call: one forward pass and encode of the text give
  every feature of that SAE (the model process's encode with `features`). A list across many SAEs costs one
  call per SAE, and a view asks at most MAX_SAES of them.
- **Metered.** Each model call counts as one model request against the viewer's quota (their API key,
  account, or address), in the store's counters the live POST routes use, so every worker shares them.
  Past the limit the page shows the reason and when the window ends instead of the activations; the list
  itself is still served (200), as a refusal of only the model's part of the page.
- **Cached.** An answer is kept per server process for CACHE_S seconds, keyed by the list, its version
  (updated_at: an edit of the text or of the entries moves it), the text and the SAE. A cached answer runs
  no model and costs no quota, so a popular link costs the model one encode per SAE every few minutes, not
  one per visitor. The cache holds at most MAX_CACHED_VALUES activations (float32), least recently used out.
"""

from __future__ import annotations

import math
import time
from array import array
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from fastapi import Request

from sae_core.errors import NotFound
from sae_core.live.errors import LiveError, Loading

from ..accounts import current_user
from ..accounts.middleware import Accounts, model_quota
from . import store

CACHE_S = 300.0
MAX_CACHED_VALUES = 4_000_000  # 16 MB of float32 per process
MAX_SAES = 16  # model calls one view may ask for (one per SAE)
# Features per model call: an answer of 256 features x 1,024 tokens (the default max_text_tokens) stays well
# under the model process's 16 MB message cap; a list holds at most 500 entries
MAX_FEATURES_PER_CALL = 256
SIGN_IN = "the model runs for signed-in users here: sign in to see them"


@dataclass(frozen=True)
class Encoded:
    """One SAE's answer on the text: the token texts and each asked feature's activation per token."""

    tokens: tuple[str, ...]
    acts: dict[int, array]

    @property
    def size(self) -> int:
        return len(self.tokens) * max(1, len(self.acts))


Key = tuple[int, str, str, str]  # list id, list version, text, SAE


class ActivationCache:
    """Answers by (list, version, text, SAE) for `ttl_s`, at most `max_values` activations in all."""

    def __init__(self, ttl_s: float = CACHE_S, max_values: int = MAX_CACHED_VALUES):
        self.ttl_s = ttl_s
        self.max_values = max_values
        self.entries: OrderedDict[Key, tuple[float, Encoded]] = OrderedDict()
        self.values = 0

    def get(self, key: Key, now: float | None = None) -> Encoded | None:
        found = self.entries.get(key)
        if found is None:
            return None
        expires, answer = found
        if (time.monotonic() if now is None else now) >= expires:
            self._drop(key)
            return None
        self.entries.move_to_end(key)
        return answer

    def put(self, key: Key, answer: Encoded, now: float | None = None) -> None:
        if answer.size > self.max_values:
            return
        if key in self.entries:
            self._drop(key)
        self.entries[key] = ((time.monotonic() if now is None else now) + self.ttl_s, answer)
        self.values += answer.size
        while self.values > self.max_values:
            self._drop(next(iter(self.entries)))

    def _drop(self, key: Key) -> None:
        _, answer = self.entries.pop(key)
        self.values -= answer.size


def cache_of(request: Request) -> ActivationCache:
    """The app's cache (per app, so that two apps in one process, as in the tests, never share answers)."""
    cache = getattr(request.app.state, "list_activations", None)
    if cache is None:
        cache = request.app.state.list_activations = ActivationCache()
    return cache


async def _encode(request: Request, sae: str, text: str, features: list[int]) -> Encoded:
    """One model call: the text encoded once by `sae`, with every feature in `features`."""
    payload = {"op": "encode", "sae": sae, "text": text, "feature": None, "top": 1, "features": features}
    answer = await request.app.state.live.call(request, payload)
    tokens = tuple(t["text"] for t in answer.get("tokens", []))
    return Encoded(tokens, {f: array("f", acts) for f, acts in zip(features, answer.get("features_acts") or [])})


def _groups(view: store.ListView, found: list[bool]) -> dict[str, list[int]]:
    """The positions of the entries to show, by SAE, in the list's order (entries the store lacks left out)."""
    groups: dict[str, list[int]] = {}
    for pos, (entry, ok) in enumerate(zip(view.entries, found)):
        if ok:
            groups.setdefault(entry.sae, []).append(pos)
    return groups


async def list_activations(request: Request, view: store.ListView, found: list[bool]) -> tuple[dict[int, dict], str | None]:
    """Each entry's activation on the list's common text by position, and why some or all are not shown."""
    text = view.common_text
    groups = _groups(view, found)
    if not text.strip() or not groups or request.method == "HEAD":
        return {}, None
    live = request.app.state.live
    if live.client is None:  # no model here: say so without counting anything
        return {}, f"live features are off: {live.off}" if live.off else "the model has not started"
    accounts: Accounts = request.app.state.accounts
    quota = model_quota(accounts.config, current_user(request), request.client.host if request.client else "unknown")
    if quota is None:
        return {}, SIGN_IN
    cache = cache_of(request)
    out: dict[int, dict] = {}
    for n, (sae, positions) in enumerate(groups.items()):
        if n == MAX_SAES:
            return out, f"the list's features come from more than {MAX_SAES} SAEs: those of the first {MAX_SAES} are shown"
        key = (view.id, view.updated_at.isoformat(), text, sae)
        answer = cache.get(key)
        if answer is None:
            features = sorted({view.entries[p].index for p in positions})
            parts: list[Encoded] = []
            for start in range(0, len(features), MAX_FEATURES_PER_CALL):
                retry = await accounts.charge(quota)
                if retry is not None:
                    return out, f"{quota.refusal()}; they show again in {math.ceil(retry)} s"
                try:
                    parts.append(await _encode(request, sae, text, features[start : start + MAX_FEATURES_PER_CALL]))
                except Loading:
                    return out, "the model is loading: reload this page in a moment"
                except (LiveError, NotFound) as exc:
                    return out, str(exc)
            answer = Encoded(parts[0].tokens, {f: a for part in parts for f, a in part.acts.items()})
            cache.put(key, answer)
        for pos in positions:
            out[pos] = _shown(answer, view.entries[pos].index)
    return out, None


def _shown(answer: Encoded, feature: int) -> dict[str, Any]:
    acts = [float(a) for a in answer.acts.get(feature, ())]
    top = max(acts, default=0.0)
    return {"max": top, "tokens": list(zip(answer.tokens, acts)), "scale": top or 1.0}
