"""Scale-out on `torch.distributed` (launched by torchrun; NCCL on GPUs, Gloo on CPUs).

- `comms`: the process groups torchrun's environment describes, as a data- x latent-parallel `Grid`
  of `Comms` objects (size 1 and no-ops in a single process);
- `data_parallel`: the explicit gradient reduction the hand-written sparse backward needs;
- `latent_parallel`: a TopK SAE whose latents are split across ranks (global top-k from local candidates);
- `checkpoint`: per-slice checkpoint files committed once by rank 0;
- `mining_parts`: which windows each part of a sharded mining run mines (`saescope mine --shard i/N`), and the merge's checks.
"""
