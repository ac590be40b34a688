"""Distributed training on the CPU with Gloo, 2 processes of one thread each: data-parallel and
latent-parallel Trainer steps against the single-process Trainer from the same initialisation, on the
same global batches (12 steps, AuxK and the weight EMA active).

Why a tolerance, and this one: the distributed steps compute the same sums in another order (each
data-parallel rank sums its half of the batch, then the halves are added; the latent-parallel decoder
adds two partial reconstructions), so each step differs by float32 rounding, ~1e-7 relative. Adam then
moves every element by about lr per step whatever the size of its gradient, so an element whose
gradient is mostly cancellation moves a fraction of lr differently: measured over the 12 steps, at
most 5e-6 (data parallel) and 6e-5 (latent parallel) on parameters of size ~0.1-1 with lr 3e-3. We
check 2e-4 absolute (7% of one step's lr) on the parameters and their EMA, 1e-5 relative on the logged
statistics, and equal dead-latent counts (they set AuxK's shapes). The latent-parallel gradients of one
step, before Adam, are checked to 1e-5 of each gradient's largest element (a slip in the algebra shows
as an error of order 1).
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from conftest import tiny_cache
from safetensors.torch import load_file

from sae_core.cache import ActivationCache
from sae_core.train import TrainConfig, Trainer

STEPS = 12


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join_group(rank: int, world: int, port: int, latent_parallel: int):
    """What torchrun sets up for a worker, then the grid the trainer is given."""
    from sae_core.distributed import comms

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    return comms.from_environment(latent_parallel, "cpu", timeout_s=60)


def spawn(fn, world: int, *args) -> None:
    mp.start_processes(fn, args=(world, free_port(), *args), nprocs=world, start_method="spawn", join=True)


@pytest.fixture(scope="module")
def cache_dir(tiny_lm, tiny_model, tiny_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("dist-cache") / "c"
    return tiny_cache(tiny_lm, tiny_model, tiny_corpus, out, tokens=32 * 64)


def config(**kw) -> TrainConfig:
    # a short dead threshold so AuxK runs from step 4 on; the EMA is checked too
    base = dict(n_latents=256, k=8, batch_size=128, tokens=128 * STEPS, lr=3e-3, dead_tokens=128 * 3, ema=0.9, device="cpu")
    return TrainConfig(**{**base, **kw})


def one_step_gradients(grid, cfg: TrainConfig) -> dict:
    """The latent-parallel loss and gradients of one step against TopKSAE's from the same parameters, as
    errors relative to each gradient's largest element (AuxK over dead latents on both ranks included)."""
    from sae_core.distributed.latent_parallel import LatentShardedTopKSAE
    from sae_core.sae import TopKConfig, TopKSAE

    arch = TopKConfig(d_in=64, n_latents=cfg.n_latents, k=cfg.k, k_aux=32, multi_topk=cfg.multi_topk)
    gen = torch.Generator().manual_seed(5)
    full = TopKSAE(arch)
    with torch.no_grad():
        for p in full.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    x = torch.randn(96, 64, generator=gen)
    dead = torch.rand(cfg.n_latents, generator=gen) < 0.2
    want = full.loss_and_grads(x, dead)
    part = LatentShardedTopKSAE(arch, grid.lp)
    part.load_state_dict(part.slice_of(full.state_dict()))
    got = part.loss_and_grads(x, part.slice_of({"d": dead})["d"])
    assert want.n_dead == got.n_dead and want.aux_fvu > 0
    out = {k: abs(getattr(got, k) - getattr(want, k)) / abs(getattr(want, k)) for k in ("loss", "fvu", "aux_fvu", "l0")}
    for name, p in part.named_parameters():
        ref = part.slice_of({name: getattr(full, name).grad})[name]
        out[name] = float((p.grad - ref).abs().max() / ref.abs().max())
    return out


def _worker(rank: int, world: int, port: int, latent_parallel: int, folder: str, cfg: TrainConfig) -> None:
    grid = join_group(rank, world, port, latent_parallel)
    exact = one_step_gradients(grid, cfg) if grid.lp.size > 1 else {}
    data = torch.load(f"{folder}/inputs.pt")
    trainer = Trainer(cfg, data["cache"], f"{folder}/run", grid=grid)
    init = data["init"] if grid.lp.size == 1 else trainer.sae.slice_of(data["init"])
    trainer.sae.load_state_dict(init)
    trainer.scale = data["scale"]
    if trainer.ema_state is not None:
        trainer.ema_state = {k: v.clone() for k, v in trainer.sae.state_dict().items()}
    part = len(data["batches"][0]) // grid.dp.size
    log = []
    for batch in data["batches"]:
        log.append(trainer.step(batch[grid.dp.rank * part : (grid.dp.rank + 1) * part]).stats())
    whole = trainer.sae if grid.lp.size == 1 else trainer.sae.gather()
    ema = trainer.ema_state
    if grid.lp.size > 1 and ema is not None:
        ema = {k: (v if k == "b_pre" else grid.lp.all_gather(v).reshape(-1, *v.shape[1:])) for k, v in ema.items()}
    if grid.is_main:
        torch.save({"log": log, "sae": whole.state_dict(), "ema": ema, "one_step": exact}, f"{folder}/result.pt")
    grid.close()


def run_both(cache_dir, tmp_path, world: int, latent_parallel: int, cfg: TrainConfig):
    """The single-process Trainer's steps and the distributed ones from the same initialisation and batches."""
    ref = Trainer(cfg, cache_dir, tmp_path / "ref")
    init = {k: v.clone() for k, v in ref.sae.state_dict().items()}
    batches = list(ActivationCache(cache_dir).batches(cfg.batch_size, seed=3))[:STEPS]
    torch.save({"cache": str(cache_dir), "init": init, "scale": ref.scale, "batches": batches}, tmp_path / "inputs.pt")
    spawn(_worker, world, latent_parallel, str(tmp_path), cfg)
    ref_log = [ref.step(b).stats() for b in batches]
    return ref, ref_log, torch.load(tmp_path / "result.pt")


def check_same_run(ref, ref_log, got) -> None:
    for step, (a, b) in enumerate(zip(ref_log, got["log"])):
        assert a["n_dead"] == b["n_dead"], (step, a, b)
        for key in ("loss", "fvu", "aux_fvu", "l0"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (step, key, a, b)
    assert ref_log[-1]["n_dead"] > 0  # AuxK ran
    for name, value in ref.sae.state_dict().items():
        torch.testing.assert_close(got["sae"][name], value, atol=2e-4, rtol=0, msg=name)
        torch.testing.assert_close(got["ema"][name], ref.ema_state[name], atol=2e-4, rtol=0, msg=f"EMA {name}")


def test_data_parallel_step_matches_one_process(cache_dir, tmp_path):
    ref, ref_log, got = run_both(cache_dir, tmp_path, 2, 1, config())
    check_same_run(ref, ref_log, got)


@pytest.mark.parametrize("multi_topk", [False, True])
def test_latent_parallel_step_matches_the_unsharded_sae(cache_dir, tmp_path, multi_topk):
    ref, ref_log, got = run_both(cache_dir, tmp_path, 2, 2, config(multi_topk=multi_topk))
    assert max(got["one_step"].values()) < 1e-5, got["one_step"]
    check_same_run(ref, ref_log, got)


def test_a_two_by_two_grid_matches_the_unsharded_sae(cache_dir, tmp_path):
    """4 ranks: 2 data-parallel groups of 2 latent-parallel ranks (each pair splits the latents and sees
    one half of the global batch; the pairs sum their gradients)."""
    ref, ref_log, got = run_both(cache_dir, tmp_path, 4, 2, config())
    check_same_run(ref, ref_log, got)


def torchrun_train(cache_dir, out, *extra: str) -> list[str]:
    bin_dir = Path(sys.executable).parent
    return [
        str(bin_dir / "torchrun"),
        "--standalone",
        "--nproc-per-node",
        "2",
        "--no-python",
        str(bin_dir / "saescope"),
        "train",
        "--activations",
        str(cache_dir),
        "--out",
        str(out),
        "--n-latents",
        "256",
        "--k",
        "8",
        "--batch-size",
        "128",
        "--tokens",
        str(128 * 400),
        "--dead-tokens",
        "1280",
        "--checkpoint-every",
        "25",
        "--device",
        "cpu",
        *extra,
    ]


def checkpoint_step(out: Path) -> int:
    try:
        return torch.load(out / "checkpoint.pt", weights_only=False)["step"]
    except (FileNotFoundError, EOFError, RuntimeError):  # not written yet
        return 0


def workers_of(pid: int) -> list[int]:
    """The ranks torchrun started (its child processes)."""
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


@pytest.mark.parametrize("layout", [[], ["--latent-parallel", "2"]], ids=["data-parallel", "latent-parallel"])
def test_a_killed_rank_fails_the_job_and_the_same_command_resumes_it(cache_dir, tmp_path, layout):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cut = tmp_path / "cut"
    job = subprocess.Popen(torchrun_train(cache_dir, cut, *layout), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 240
    while checkpoint_step(cut) < 100 and job.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert job.poll() is None, "the run ended before it could be killed"
    os.kill(workers_of(job.pid)[1], signal.SIGKILL)
    _, err = job.communicate(timeout=120)
    assert job.returncode != 0
    # torchrun stops the other rank and names the one that died as the root cause (across nodes, where no
    # agent stops it, the surviving rank's collective fails with RankLost: test_a_lost_rank_is_a_clear_error)
    root_cause = err.split("Root Cause")[-1]
    assert "rank      : 1" in root_cause and "SIGKILL" in root_cause, err[-2000:]
    assert checkpoint_step(cut) < 400
    # the same command with --resume continues from the last checkpoint and ends where an uninterrupted run ends
    resumed = subprocess.run(torchrun_train(cache_dir, cut, *layout, "--resume"), capture_output=True, text=True, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    whole = subprocess.run(torchrun_train(cache_dir, tmp_path / "whole", *layout), capture_output=True, text=True, env=env, timeout=300)
    assert whole.returncode == 0, whole.stderr[-3000:]
    a, b = load_file(cut / "sae_weights.safetensors"), load_file(tmp_path / "whole" / "sae_weights.safetensors")
    for name in a:
        assert torch.equal(a[name], b[name]), name  # bitwise: Gloo's sums and the resumed batch order are deterministic
    log = [json.loads(line)["step"] for line in (cut / "train_log.jsonl").read_text().splitlines()]
    assert log == sorted(set(log)) and log[-1] == 400  # the lines after the checkpoint were dropped, none repeated
    # another layout refuses the checkpoint and names the difference
    other = ["--latent-parallel", "2"] if not layout else []
    again = subprocess.run(torchrun_train(cache_dir, cut, *other, "--resume"), capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode != 0 and "resume with the same" in again.stderr and "--latent-parallel" in again.stderr


GLOO_THREADS = ("pt_gloo_runloop", "gloo_tcp_loop", "pt_tcpstore_uv")  # its workers, its sockets' loop, rank 0's store


def thread_names() -> list[str]:
    return sorted(Path(f"/proc/self/task/{t}/comm").read_text().strip() for t in os.listdir("/proc/self/task"))


def _close_and_list_threads(rank: int, world: int, port: int, folder: str) -> None:
    grid = join_group(rank, world, port, 1)
    torch.optim.Adam([torch.nn.Parameter(torch.ones(4))])  # as a Trainer does once the group exists (it imports torch._dynamo)
    importlib.import_module("torch.distributed.nn.functional")  # the module whose defaults held the world group
    grid.dp.sum_all_([torch.ones(8), torch.ones(3)])
    before = thread_names()
    grid.close()
    Path(folder, f"threads-{rank}.json").write_text(json.dumps({"before": before, "after": thread_names()}))


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="thread names are read from Linux's /proc")
def test_closing_the_grid_ends_the_gloo_threads(tmp_path):
    """Grid.close frees the groups then and there: a Gloo thread left running into interpreter shutdown
    aborted a rank whose work was done ("terminate called without an active exception", issue 26)."""
    spawn(_close_and_list_threads, 2, str(tmp_path))
    for rank in range(2):
        threads = json.loads((tmp_path / f"threads-{rank}.json").read_text())
        assert "pt_gloo_runloop" in threads["before"], threads
        assert not set(GLOO_THREADS) & set(threads["after"]), (rank, threads)


def _lose_a_rank(rank: int, world: int, port: int, folder: str) -> None:
    from sae_core.distributed.comms import RankLost

    grid = join_group(rank, world, port, 1)
    if rank == 1:
        os._exit(3)  # gone without a word, as a crashed process or a lost node
    try:
        grid.dp.sum(torch.ones(4))
        grid.dp.sum(torch.ones(4))
    except RankLost as exc:
        Path(folder, "error.txt").write_text(str(exc))


def test_a_lost_rank_is_a_clear_error(tmp_path):
    ctx = mp.start_processes(_lose_a_rank, args=(2, free_port(), str(tmp_path)), nprocs=2, start_method="spawn", join=False)
    for p in ctx.processes:
        p.join(timeout=120)
    message = (tmp_path / "error.txt").read_text()
    assert message.startswith("rank 0 lost the other ranks (") and "run the same command again (train: with --resume)" in message
