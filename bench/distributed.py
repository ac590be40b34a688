"""Scale-out on this machine: TopK training with 1 and 2 ranks (data- and latent-parallel) and mining
with 1 and 2 shards, one thread per rank (Gloo on the CPU), each figure against the 1-rank reference
measured in the same run.

    python bench/distributed.py [--steps 5] [--part train|mine|all] [--sae FOLDER] [--mine-tokens 32768]

Training: config A (d 576, 16,384 latents, k 32, global batch 4,096, fp32, AuxK on: 10% of latents
forced dead), the structured random data of bench/peers/common.py. Each rank runs Trainer.step's
sequence on its part (the SAE's loss_and_grads with the data-parallel denominators, the gradient
reduction, the parallel-gradient removal, Adam, the decoder renormalisation) after 2 warm-up steps;
the median over --steps steps of the slowest rank's step time gives tokens/s. Communication: the
seconds a rank waits in collectives per step and the bytes it contributes (sae_core/distributed/comms.Timer).

Mining: the SAE folder (default: the demo's) copied into bench/out/distributed without its cache
reference, so every window runs the model; the model is loaded before the clock starts. 1 shard = one
process mining --mine-tokens tokens and publishing them; 2 shards = two processes mining --shard 0/2 and
1/2 at the same time, then one merge (--merge-shards 2), whose store equals the single run's (checked).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench" / "peers"))
sys.path.insert(0, str(ROOT))
from common import CONFIGS, dead_mask, structured_batches  # noqa: E402

OUT = ROOT / "bench" / "out" / "distributed"
DEMO_SAE = Path(os.environ.get("SAESCOPE_HOME", "~/.local/share/saescope")).expanduser() / "runs" / "demo" / "smollm2-135m-L8-topk-8k"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join(rank: int, world: int, port: int, latent_parallel: int):
    from sae_core.distributed import comms

    torch.set_num_threads(1)
    if world == 1:
        return comms.single_process()
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    return comms.from_environment(latent_parallel, "cpu")


# ---------------------------------------------------------------- training


def _train_rank(rank: int, world: int, port: int, latent_parallel: int, steps: int, result: str) -> None:
    from sae_core.distributed.data_parallel import reduce_step
    from sae_core.hardware import keep_large_buffers
    from sae_core.train import TrainConfig, build_sae

    keep_large_buffers()
    grid = join(rank, world, port, latent_parallel)
    c = CONFIGS["A"]
    sae = build_sae(TrainConfig(n_latents=c["n"], k=c["k"]), c["d"], grid.lp)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4, eps=6.25e-10, fused=True)
    batches = structured_batches(c["d"], c["n"], c["batch"], count=2)
    part = c["batch"] // grid.dp.size
    dead = dead_mask(c["n"], True)
    dead = dead if grid.lp.size == 1 else sae.slice_of({"d": dead})["d"]
    times, cpu, comm, sent = [], [], [], []
    for i in range(steps + 2):
        x = batches[i % 2][grid.dp.rank * part : (grid.dp.rank + 1) * part]
        grid.world.barrier()
        t0, p0, c0, b0 = time.perf_counter(), time.process_time(), grid.world.timer.seconds, grid.world.timer.bytes
        stats = sae.loss_and_grads(x, dead, group_sum=grid.dp.group_sum)
        reduce_step(list(sae.parameters()), stats, grid.dp)
        sae.remove_parallel_grads()
        opt.step()
        sae.normalize_decoder()
        if i >= 2:
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - p0)
            comm.append(grid.world.timer.seconds - c0)
            sent.append(grid.world.timer.bytes - b0)
    summary = {"step_s": statistics.median(times), "cpu_s": statistics.median(cpu), "comm_s": statistics.median(comm), "bytes": sent[-1]}
    Path(f"{result}.{rank}").write_text(json.dumps(summary))
    grid.close()


def train_mode(name: str, world: int, latent_parallel: int, steps: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result = f"{tmp}/r"
        mp.start_processes(_train_rank, args=(world, free_port(), latent_parallel, steps, result), nprocs=world, start_method="spawn")
        ranks = [json.loads(Path(f"{result}.{r}").read_text()) for r in range(world)]
    step = max(r["step_s"] for r in ranks)
    return {
        "mode": name,
        "ranks": world,
        "tok_s": CONFIGS["A"]["batch"] / step,
        "step_s": step,
        "comm_s": max(r["comm_s"] for r in ranks),
        "cpu_s": max(r["cpu_s"] for r in ranks),
        "mb_per_rank": max(r["bytes"] for r in ranks) / 2**20,
    }


def bench_training(steps: int) -> list[dict]:
    rows = [train_mode("1 rank", 1, 1, steps), train_mode("data-parallel", 2, 1, steps), train_mode("latent-parallel", 2, 2, steps)]
    print("\nTopK training, config A fp32, AuxK on, global batch 4,096, one thread per rank (Gloo)")
    print("(CPU s: a rank's CPU time per step, its compute share on a machine others load too; comm s: wall time in collectives)")
    print(f"{'mode':<16} {'ranks':>5} {'tok/s':>8} {'vs 1 rank':>9} {'step s':>7} {'CPU s/rank':>10} {'comm s':>7} {'MiB/rank/step':>13}")
    for r in rows:
        print(
            f"{r['mode']:<16} {r['ranks']:>5} {r['tok_s']:>8,.0f} {r['tok_s'] / rows[0]['tok_s']:>8.2f}x {r['step_s']:>7.3f} "
            f"{r['cpu_s']:>10.3f} {r['comm_s']:>7.3f} {r['mb_per_rank']:>13.1f}"
        )
    return rows


# ---------------------------------------------------------------- mining


def _mine_rank(rank: int, sae: str, db_url: str, tokens: int, shard: str | None, merge: int | None, result: str) -> None:
    """One mining process: its part (`shard`, formatted with the rank) or the merge of `merge` parts."""
    from sae_core.interchange import load_sae
    from sae_core.mine import MineConfig, mine
    from sae_core.model import load_model

    torch.set_num_threads(1)
    lm = load_model(load_sae(sae).provenance.model, "cpu", "auto")
    cfg = MineConfig(tokens=tokens, windows_per_chunk=32, db=db_url, device="cpu", shard=shard and shard.format(rank), merge_shards=merge)
    t0, p0 = time.perf_counter(), time.process_time()
    mine(sae, cfg, lm=lm, progress=False)
    Path(f"{result}.{rank}").write_text(json.dumps({"seconds": time.perf_counter() - t0, "cpu": time.process_time() - p0}))


def timed(sae: Path, db_url: str, tokens: int, shard: str | None, merge: int | None, procs: int, result: str) -> dict:
    mp.start_processes(_mine_rank, args=(str(sae), db_url, tokens, shard, merge, result), nprocs=procs, start_method="spawn")
    runs = [json.loads(Path(f"{result}.{r}").read_text()) for r in range(procs)]
    return {"seconds": max(r["seconds"] for r in runs), "cpu": max(r["cpu"] for r in runs)}


def bench_mining(src: Path, tokens: int) -> list[dict]:
    """1 shard = part 0/1 then its merge (what a single-process `mine` does, split where the parts split);
    2 shards = parts 0/2 and 1/2 at the same time, then their merge."""
    sys.path.insert(0, str(ROOT / "bench"))
    from compare_stores import QUERIES, rows

    OUT.mkdir(parents=True, exist_ok=True)
    sae = OUT / "sae"
    shutil.rmtree(sae, ignore_errors=True)
    sae.mkdir()
    cfg = json.loads((src / "cfg.json").read_text())
    cfg["metadata"]["saescope"].pop("activations", None)  # mine from the model, not from the demo's cache
    (sae / "cfg.json").write_text(json.dumps(cfg))
    shutil.copy(src / "sae_weights.safetensors", sae / "sae_weights.safetensors")
    out: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        one, two = f"sqlite:///{tmp}/one.db", f"sqlite:///{tmp}/two.db"
        for name, url, parts in (("1 shard", one, 1), ("2 shards", two, 2)):
            mined = timed(sae, url, tokens, "{}/" + str(parts), None, parts, f"{tmp}/{parts}-part")
            merged = timed(sae, url, tokens, None, parts, 1, f"{tmp}/{parts}-merge")
            out.append({"mode": f"{name}: mining", **mined})
            out.append({"mode": f"{name}: merge", **merged})
            out.append({"mode": f"{name}: total", "seconds": mined["seconds"] + merged["seconds"], "cpu": mined["cpu"] + merged["cpu"]})
        same = all(rows(one, table, None) == rows(two, table, None) for table in QUERIES)
    print(f"\nMining {tokens:,} tokens of the demo corpus (SmolLM2-135M layer 8, 8,192 latents), one thread per process")
    print("(mining: the model and the SAE over the windows, the slowest part; merge: statistics, logit effects, neighbours, the store)")
    print(f"{'mode':<18} {'seconds':>8} {'tok/s':>8} {'vs 1 shard':>10} {'CPU s/process':>13}")
    for i, r in enumerate(out):
        ref = out[i % 3]
        ratio = ref["seconds"] / r["seconds"]
        print(f"{r['mode']:<18} {r['seconds']:>8.1f} {tokens / r['seconds']:>8,.0f} {ratio:>9.2f}x {r['cpu']:>13.1f}")
    print(f"stores identical (bench/compare_stores.py's tables): {same}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--part", choices=["train", "mine", "all"], default="all")
    ap.add_argument("--sae", type=Path, default=DEMO_SAE, help="SAE folder to mine (a copy is mined)")
    ap.add_argument("--mine-tokens", type=int, default=32768)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs")
    if args.part in ("train", "all"):
        bench_training(args.steps)
    if args.part in ("mine", "all"):
        bench_mining(args.sae, args.mine_tokens)


if __name__ == "__main__":
    main()
