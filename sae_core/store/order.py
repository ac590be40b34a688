"""Any page of an SAE's sorted, filtered feature table in a few index lookups, however many features.

`OFFSET n` walks n index entries: the last page of a 1M-feature table cost a scan of the table, and so
did counting it. A mined run never changes, so `write_run` stores, for every sort key and filter, the
table's length and a checkpoint every `EVERY` rows (the sort value and feature index found there):
a page at offset o starts from the checkpoint at or before o and walks fewer than `EVERY` rows from it
(`page_plan`). Descending order is ascending read backwards (ties by index descending too).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal, NamedTuple

import numpy as np

EVERY = 128  # rows between checkpoints: 12 * n / 128 checkpoint rows per run; a page walks < 128 extra rows
RARE_DENSITY = 1e-4  # the "rare" filter: fires, but on fewer than 1 in 10,000 positions
SORTS = ("index", "density", "max_act")
FILTERS = ("all", "alive", "dead", "rare")
Filter = Literal["all", "alive", "dead", "rare"]  # the values of FILTERS, for type checks and the API
COLUMNS = ("run_id", "sort", "filter", "position", "feature_index", "value", "total")  # checkpoint_rows' tuples


def filter_mask(flt: str, density: np.ndarray) -> np.ndarray:
    """The features a filter keeps (the SQL of app/queries.py says the same in terms of `density`)."""
    if flt == "all":
        return np.ones(len(density), dtype=bool)
    if flt == "alive":
        return density > 0
    if flt == "dead":
        return density == 0
    if flt == "rare":
        return (density > 0) & (density < RARE_DENSITY)
    raise ValueError(f"unknown filter {flt!r}")


def checkpoint_rows(
    run_id: int, density: np.ndarray, max_act: np.ndarray, every: int | None = None
) -> Iterator[tuple[int, str, str, int, int, float, int]]:
    """Rows of `feature_order` for a run, as COLUMNS tuples: per (sort, filter), one every `every`
    positions of the ascending order (value, then index), each carrying the list's length; an empty
    list gets one row with feature_index -1, so that its length is stored too."""
    every = every or EVERY
    values = {
        "index": np.arange(len(density), dtype=np.float64),
        "density": density.astype(np.float64),
        "max_act": max_act.astype(np.float64),
    }
    for sort in SORTS:
        for flt in FILTERS:
            kept = np.nonzero(filter_mask(flt, density))[0]
            v = values[sort][kept]
            ordered = kept[np.lexsort((kept, v))]  # by value, ties by index
            total = len(ordered)
            if total == 0:
                yield (run_id, sort, flt, 0, -1, 0.0, 0)
            for pos in range(0, total, every):
                i = int(ordered[pos])
                yield (run_id, sort, flt, pos, i, float(values[sort][i]), total)


class PagePlan(NamedTuple):
    """The ascending positions a page covers: `take` rows from `start`; `reverse`: the page is that
    range read backwards (descending order)."""

    start: int  # ascending position of the first row read
    take: int
    reverse: bool


def page_plan(total: int, offset: int, limit: int, descending: bool) -> PagePlan:
    """The ascending range [start, start + take) that holds the page at `offset` in the given order."""
    if not descending:
        return PagePlan(offset, max(0, min(limit, total - offset)), False)
    end = total - offset  # descending offset o is ascending position total-1-o
    start = max(0, end - limit)
    return PagePlan(start, max(0, end - start), True)
