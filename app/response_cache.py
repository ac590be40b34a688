"""A bounded cache of rendered responses, and their gzip form.

A mined run never changes, so a store read's answer is a function of its ETag (app/http.py: the
SAE's live run, the code, the path and query, the htmx flag) and of the encoding the client takes.
Entries are keyed by exactly that: a re-mine changes the tag of every page of the SAE at once, so a
page of a run that is no longer live is never served (its entries just age out). One cache per
server process, shared by all its requests; requests run on the event loop, so it needs no lock.
"""

from __future__ import annotations

import os
import zlib
from collections import OrderedDict
from typing import NamedTuple

from sae_core.errors import SaescopeError

ENV_CACHE_MB = "SAESCOPE_RESPONSE_CACHE_MB"
DEFAULT_CACHE_MB = 64
MIN_COMPRESS = 1024  # smaller bodies gain less than gzip's own overhead
GZIP_LEVEL = 6  # zlib's default: most of level 9's saving at a fraction of its CPU
COMPRESSIBLE = (b"text/html", b"application/json", b"text/css", b"application/javascript", b"image/svg+xml")


class Entry(NamedTuple):
    headers: list[tuple[bytes, bytes]]  # the app's headers, content-length and -encoding already right
    body: bytes


def cache_mb_from_env() -> int:
    """$SAESCOPE_RESPONSE_CACHE_MB (0 turns the cache off), else DEFAULT_CACHE_MB (app/config.py reads it)."""
    raw = os.environ.get(ENV_CACHE_MB)
    if raw is None:
        return DEFAULT_CACHE_MB
    if not raw.strip().isdigit():
        raise SaescopeError(f"{ENV_CACHE_MB} must be a whole number of megabytes (0 turns the cache off), not {raw!r}")
    return int(raw)


class ResponseCache:
    """Least-recently-used entries whose bodies add up to at most `max_bytes`."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = self.misses = 0
        self._entries: OrderedDict[tuple, Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: tuple) -> Entry | None:
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry

    def put(self, key: tuple, entry: Entry) -> None:
        size = len(entry.body)
        if size > self.max_bytes // 4:  # one huge answer must not flush everything else
            return
        if key in self._entries:
            self.bytes -= len(self._entries.pop(key).body)
        self._entries[key] = entry
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, old = self._entries.popitem(last=False)
            self.bytes -= len(old.body)


def accepts_gzip(accept_encoding: str | None) -> bool:
    """Whether the client takes gzip (and did not refuse it with q=0)."""
    for part in (accept_encoding or "").lower().split(","):
        name, _, params = part.strip().partition(";")
        if name.strip() in ("gzip", "*"):
            return params.replace(" ", "") not in ("q=0", "q=0.0", "q=0.00", "q=0.000")
    return False


def gzip_entry(headers: list[tuple[bytes, bytes]], body: bytes) -> Entry:
    """The gzip representation of a response, or the response itself when it is small or not text."""
    content_type = next((v for k, v in headers if k.lower() == b"content-type"), b"")
    if len(body) < MIN_COMPRESS or not content_type.startswith(COMPRESSIBLE):
        return Entry(headers, body)
    compressor = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31)  # wbits 31: a gzip container
    packed = compressor.compress(body) + compressor.flush()
    kept = [(k, v) for k, v in headers if k.lower() not in (b"content-length", b"content-encoding")]
    return Entry([*kept, (b"content-encoding", b"gzip"), (b"content-length", str(len(packed)).encode())], packed)
