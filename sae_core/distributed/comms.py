"""The ranks a run is spread over, as `torch.distributed` process groups: what the trainer and the miner
are given instead of talking to `torch.distributed` themselves (OpenAI's sparse_autoencoder passes its
training loop a small `Comms` object the same way).

`Comms` is one group of ranks that reduce together; a single process gets one of size 1 whose
operations do nothing, so the single-process path runs exactly the code it always ran. `Grid` lays
the world out as data-parallel x latent-parallel: rank = dp_rank * lp_size + lp_rank, so the ranks
that split the latents (and exchange every step) are neighbours, on one node when they fit.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

from ..errors import SaescopeError

LONG_WAIT_S = 7 * 24 * 3600.0  # mining: the ranks done first wait for the slowest part at the merge


@dataclass
class Timer:
    """Seconds spent waiting on collectives (what bench/distributed.py reports as communication time)."""

    seconds: float = 0.0
    calls: int = 0
    bytes: int = 0  # payload this rank contributed (all-reduce and broadcast: the tensor; all-gather: its own part)


class RankLost(SaescopeError):
    """A collective failed: another rank of the job has stopped (killed, crashed, or its node gone)."""

    def __init__(self, exc: BaseException):
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        super().__init__(
            f"rank {dist.get_rank() if dist.is_initialized() else '?'} lost the other ranks ({first[:200]}); "
            "whole checkpoints and mined chunks are kept: run the same command again (train: with --resume) to continue"
        )


class Comms:
    """A group of `size` ranks; this process is `rank` in it. With size 1 every operation returns its input."""

    def __init__(self, group: dist.ProcessGroup | None = None, size: int = 1, rank: int = 0, timer: Timer | None = None) -> None:
        self.group, self.size, self.rank = group, size, rank
        self.timer = timer or Timer()

    @property
    def group_sum(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """`sum` for a group of several ranks, None for one: what the SAEs' loss takes to use the whole group's batch."""
        return self.sum if self.size > 1 else None

    def _timed(self, fn: Callable[..., Any], *args: Any, nbytes: int = 0, **kwargs: Any) -> Any:
        self.timer.bytes += nbytes
        t0 = time.perf_counter()
        try:
            out = fn(*args, **kwargs)
        except (RuntimeError, dist.DistError) as exc:
            raise RankLost(exc) from exc
        self.timer.seconds += time.perf_counter() - t0
        self.timer.calls += 1
        return out

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """The sum of `t` over the group (a new tensor; `t` is left as it is)."""
        if self.size == 1:
            return t
        out = t.clone()
        self._timed(dist.all_reduce, out, group=self.group, nbytes=out.nbytes)
        return out

    def sum_all_(self, tensors: list[torch.Tensor]) -> None:
        """Sum each tensor over the group in place, all in flight at once (one wait for the lot)."""
        if self.size == 1:
            return

        def reduce_all() -> None:
            for w in [dist.all_reduce(t, group=self.group, async_op=True) for t in tensors]:
                w.wait()

        self._timed(reduce_all, nbytes=sum(t.nbytes for t in tensors))

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """[size, *t.shape]: every rank's `t`, in rank order."""
        if self.size == 1:
            return t.unsqueeze(0)
        parts = [torch.empty_like(t) for _ in range(self.size)]
        self._timed(dist.all_gather, parts, t.contiguous(), group=self.group, nbytes=t.nbytes)
        return torch.stack(parts)

    def broadcast_(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Overwrite `t` with the copy of the group's rank `src`."""
        if self.size > 1:
            self._timed(dist.broadcast, t, group_src=src, group=self.group, nbytes=t.nbytes)
        return t

    def barrier(self) -> None:
        if self.size > 1:
            self._timed(dist.barrier, group=self.group)


@dataclass
class Grid:
    """The world as data-parallel groups (ranks that hold the same latents and average their
    gradients) by latent-parallel groups (ranks that split the latents and see the same batch)."""

    world: Comms = field(default_factory=Comms)
    dp: Comms = field(default_factory=Comms)
    lp: Comms = field(default_factory=Comms)
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.world.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world.size > 1

    def layout(self) -> dict:
        """What a checkpoint records: a resume must find the same."""
        return {"world_size": self.world.size, "latent_parallel": self.lp.size}

    def close(self, failed: bool = False) -> None:
        """Leave the process group, once every rank is done with it (a rank tearing its connections down
        while another still uses them aborts that one); after a failure at once, waiting for no one.

        The groups are freed here, not at interpreter shutdown: a Gloo group's worker threads live as long
        as the group object, and one releasing its last finished collective then (a barrier holds the
        all-reduce before it, whose tensors hold Python objects) must take the GIL, which a finalizing
        Python refuses by ending the thread inside a noexcept destructor: "terminate called without an
        active exception", a rank aborted after its work was done (issue 26). destroy_process_group only
        forgets torch's own references; these are ours (see also from_environment)."""
        if dist.is_initialized():
            if not failed:
                self.world.barrier()
            dist.destroy_process_group()
        for comms in (self.world, self.dp, self.lp):
            comms.group = None

    @contextmanager
    def joined(self) -> Iterator[Grid]:
        """The grid for a `with` block: closed at its end, or at once when it raises."""
        try:
            yield self
        except BaseException:
            self.close(failed=True)
            raise
        self.close()


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def single_process() -> Grid:
    return Grid()


def device_for(device: str, grid: Grid) -> str:
    """One GPU per process on a node: `cuda` (or `auto` with CUDA present) becomes cuda:LOCAL_RANK."""
    if grid.distributed and (device == "cuda" or (device == "auto" and torch.cuda.is_available())):
        return f"cuda:{grid.local_rank}"
    return device


def from_environment(latent_parallel: int = 1, device: str = "auto", timeout_s: float = 600.0) -> Grid:
    """The grid torchrun's environment describes (a single process outside torchrun): joins the process
    group (NCCL for GPUs, Gloo for CPUs) through torchrun's rendezvous (MASTER_ADDR / MASTER_PORT) and
    builds the data- and latent-parallel groups. `timeout_s` bounds a wait on a rank that is gone."""
    if not under_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        if latent_parallel != 1:
            raise SaescopeError(f"--latent-parallel {latent_parallel} needs that many ranks: launch with torchrun --nproc-per-node")
        return single_process()
    world_size, rank, local_rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0))
    if latent_parallel < 1 or world_size % latent_parallel:
        raise SaescopeError(f"--latent-parallel {latent_parallel} must divide the world size {world_size} (torchrun's ranks)")
    gpu = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if gpu:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        # torch.distributed.nn.functional's functions take `group=group.WORLD` as a default argument, evaluated
        # when the module is first imported: imported after this (torch.optim imports it through torch._dynamo)
        # they would hold the world group past Grid.close and into interpreter shutdown. Imported now they hold None.
        from torch.distributed.nn import functional  # noqa: F401

        dist.init_process_group("nccl" if gpu else "gloo", timeout=timedelta(seconds=timeout_s))
    timer = Timer()
    lp_size, dp_size = latent_parallel, world_size // latent_parallel
    world = Comms(dist.group.WORLD, world_size, rank, timer)
    dp_rank, lp_rank = divmod(rank, lp_size)
    lp = dp = Comms(timer=timer)
    # every rank creates every group, in the same order (new_group is collective)
    for d in range(dp_size):
        ranks = [d * lp_size + j for j in range(lp_size)]
        g = dist.new_group(ranks) if 1 < lp_size < world_size else dist.group.WORLD
        if d == dp_rank and lp_size > 1:
            lp = Comms(g, lp_size, lp_rank, timer)
    for j in range(lp_size):
        ranks = [d * lp_size + j for d in range(dp_size)]
        g = dist.new_group(ranks) if 1 < dp_size < world_size else dist.group.WORLD
        if j == lp_rank and dp_size > 1:
            dp = Comms(g, dp_size, dp_rank, timer)
    return Grid(world, dp, lp, local_rank)
