"""Checkpoints of latent-parallel runs: no rank holds the whole dictionary, so each slice's state (its
parameters, Adam moments, dead-latent counters and EMA) goes to a file of its own, written atomically by
the first data-parallel rank of its column; once every slice of a step is on disk, rank 0 writes
`checkpoint.pt` naming them, atomically. That rename is the commit: a run killed before it resumes from
the previous step's checkpoint, whose slice files are deleted only after the next commit."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

import torch

from .comms import Grid

SLICE = re.compile(r"\.lp(\d+)-of-(\d+)\.step(\d+)\.pt$")


def slice_name(path: Path, lp_rank: int, lp_size: int, step: int) -> str:
    return f"{path.stem}.lp{lp_rank:03d}-of-{lp_size:03d}.step{step}.pt"


def save_sliced(path: Path, meta: dict, part: dict, grid: Grid, step: int, save: Callable[[Path, dict], None]) -> None:
    """Write this rank's slice (one writer per slice), then rank 0 commits `path` once all are written."""
    names = [slice_name(path, j, grid.lp.size, step) for j in range(grid.lp.size)]
    if grid.dp.rank == 0:
        save(path.parent / names[grid.lp.rank], part)
    grid.world.barrier()
    if grid.is_main:
        save(path, {**meta, "slices": names})
        for old in path.parent.glob(f"{path.stem}.lp*-of-*.step*.pt"):
            m = SLICE.search(old.name)
            if m and int(m.group(3)) < step:
                old.unlink(missing_ok=True)


def load_slice(folder: Path, state: dict, grid: Grid) -> dict:
    """This rank's slice of the committed checkpoint `state`."""
    return torch.load(Path(folder) / state["slices"][grid.lp.rank], map_location="cpu", weights_only=False)
