"""The one encoding of an example's tokens and activations in the store: packed little-endian arrays,
int32 token ids and float16 activations (6 bytes per token instead of a row per token). The miner
writes through `pack_*`, the app reads through `unpack_*`, and `decode_rows`. Explanation embeddings
are stored the same way, one float16 row per explanation (`pack_embeddings`, `unpack_embeddings`)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from numpy.typing import ArrayLike

ID_DTYPE = np.dtype("<i4")
ACT_DTYPE = np.dtype("<f2")
ACT_DECIMALS = 4  # float16 holds ~3 significant digits: more decimals would only lengthen JSON
EMBEDDING_DTYPE = np.dtype("<f2")


def pack_ids(ids: ArrayLike) -> bytes:
    return np.asarray(ids, dtype=ID_DTYPE).tobytes()


def pack_acts(acts: ArrayLike) -> bytes:
    return np.asarray(acts, dtype=ACT_DTYPE).tobytes()


def pack_rows(ids: np.ndarray, acts: np.ndarray) -> tuple[list[bytes], list[bytes]]:
    """`pack_ids` and `pack_acts` of every row of two [rows, tokens] arrays, converted in one pass."""
    id_rows, act_rows = np.ascontiguousarray(ids, dtype=ID_DTYPE), np.ascontiguousarray(acts, dtype=ACT_DTYPE)
    return [r.tobytes() for r in id_rows], [r.tobytes() for r in act_rows]


def unpack_ids(blob: bytes) -> list[int]:
    return np.frombuffer(blob, dtype=ID_DTYPE).tolist()


def unpack_acts(blob: bytes) -> list[float]:
    return np.frombuffer(blob, dtype=ACT_DTYPE).astype(np.float32).tolist()


def decode_rows(id_blobs: Sequence[bytes], act_blobs: Sequence[bytes]) -> list[tuple[list[int], list[float]]]:
    """(token ids, activations rounded to ACT_DECIMALS) of many examples, decoded in one pass over all
    of them: a page holds tens of examples, and one numpy call per array cost more than the query."""
    ends = np.cumsum([len(b) // ACT_DTYPE.itemsize for b in act_blobs]).tolist()
    ids = np.frombuffer(b"".join(id_blobs), dtype=ID_DTYPE).tolist()
    acts = np.frombuffer(b"".join(act_blobs), dtype=ACT_DTYPE).astype(np.float64).round(ACT_DECIMALS).tolist()
    return [(ids[a:b], acts[a:b]) for a, b in zip([0] + ends[:-1], ends)]


def pack_embeddings(vectors: ArrayLike) -> list[bytes]:
    """Float16 little-endian, one blob per row (768 bytes for 384 dimensions)."""
    return [row.tobytes() for row in np.asarray(vectors, dtype=EMBEDDING_DTYPE)]


def unpack_embeddings(blobs: Sequence[bytes], dim: int = -1) -> np.ndarray:
    """[len(blobs), dim] float32 from blobs of `pack_embeddings` (dim -1: read from the blobs' length)."""
    return np.frombuffer(b"".join(blobs), dtype=EMBEDDING_DTYPE).reshape(len(blobs), dim).astype(np.float32)
