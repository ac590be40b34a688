"""The parts of a sharded mining run (`saescope mine --shard i/N`): which windows each of N workers mines,
and the merge's view of their work.

Part i of N mines whole chunks [i C / N, (i+1) C / N) of the C chunks the run's windows fill, into its
own folder `<sae>/mining/part-i-of-N/` (resumable like the single-process chunks). Because the parts
are cut at chunk boundaries, the merge sees exactly the chunks one process writes, with the same first
windows: the statistics sweep (feature_stats.compute), whose interval-sampling keys are seeded per
chunk by its first window, then gives exactly what one process over the same tokens gives, top
contexts, reservoirs, histograms, moments and counts alike, and the run is published in one switch
like any other.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

from ..errors import SaescopeError
from ..shard_writer import MANIFEST
from .comms import Grid


@dataclass(frozen=True)
class Part:
    index: int
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def folder(self, work: Path) -> Path:
        return Path(work) / f"part-{self.index:03d}-of-{self.count:03d}"

    def windows(self, n_windows: int, per_chunk: int) -> tuple[int, int]:
        """[first, last) windows of this part: whole chunks, as evenly spread as they go."""
        chunks = -(-n_windows // per_chunk)
        lo, hi = self.index * chunks // self.count, (self.index + 1) * chunks // self.count
        return min(lo * per_chunk, n_windows), min(hi * per_chunk, n_windows)


def parse(spec: str) -> Part:
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", spec)
    if not m or not 0 <= int(m.group(1)) < int(m.group(2)):
        raise SaescopeError(f"--shard takes I/N with 0 <= I < N, e.g. 0/4 (got {spec!r})")
    return Part(int(m.group(1)), int(m.group(2)))


def plan(shard: str | None, merge_shards: int | None, grid: Grid) -> tuple[Part | None, int | None]:
    """(the part this process mines, None for all windows; how many parts it then merges and publishes,
    None for no merge). Under torchrun rank r of W mines part r/W and rank 0 merges the W parts."""
    if shard is not None and merge_shards is not None:
        raise SaescopeError("--shard mines a part and --merge-shards publishes the parts: run them as separate commands")
    if merge_shards is not None and merge_shards < 1:
        raise SaescopeError("--merge-shards must be at least 1")
    if grid.distributed:
        if shard is not None or merge_shards is not None:
            raise SaescopeError("under torchrun each rank mines its own part and rank 0 merges: leave out --shard and --merge-shards")
        return Part(grid.world.rank, grid.world.size), (grid.world.size if grid.is_main else None)
    return (parse(shard) if shard is not None else None), merge_shards


def part_chunks(work: Path, count: int, n_windows: int, per_chunk: int) -> tuple[list[Path], list[int], Path]:
    """The chunk files of parts 0..count-1 in window order, each one's first window in the whole run,
    and the first part's folder (its documents.json). A part not mined to its end, or mined for another
    split of the windows (other --tokens or --windows-per-chunk), is named."""
    paths, offsets = [], []
    for i in range(count):
        part = Part(i, count)
        folder = part.folder(work)
        manifest = folder / MANIFEST
        if not manifest.exists() or not json.loads(manifest.read_text()).get("complete"):
            raise SaescopeError(f"part {part} is not mined to its end ({folder}): run `saescope mine ... --shard {part}` first")
        first, last = part.windows(n_windows, per_chunk)
        if json.loads(manifest.read_text())["encoder"].get("part") != [i, count, first, last]:
            raise SaescopeError(f"{folder} holds part {part} of another split of the windows; mine it again with the same --tokens")
        for path in sorted(folder.glob("shard_*.safetensors")):
            with safe_open(str(path), "pt") as f:
                offsets.append(first + int(f.metadata()["first_window"]))
            paths.append(path)
    return paths, offsets, Part(0, count).folder(work)
