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

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from sae_core.cache import ActivationCache, CacheConfig, build_cache
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
    cfg = CacheConfig(model=str(tiny_model), corpus=str(tiny_corpus), hook="blocks.1.hook_resid_post", context_size=32,
                      tokens=32 * 64, batch_size=8, windows_per_shard=16, dtype="float32", device="cpu", model_dtype="float32")
    build_cache(cfg, out, lm=tiny_lm, progress=False)
    return out


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
    assert want["n_dead"] == got["n_dead"] and want["aux_fvu"] > 0
    out = {k: abs(got[k] - want[k]) / abs(want[k]) for k in ("loss", "fvu", "aux_fvu", "l0")}
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
