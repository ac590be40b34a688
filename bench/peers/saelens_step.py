"""sae-lens: one `SAETrainer.step` of a `TopKTrainingSAE` (its public trainer and SAE classes).

Dead latents: SAETrainer marks a latent dead when `n_forward_passes_since_fired` exceeds
`dead_feature_window`; the driver sets that counter for 10% of latents before every step.
bf16 = the trainer's own `autocast=True`.
"""

import sys
from importlib.metadata import version
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CONFIGS, dead_mask, parse_args, report, structured_batches, time_steps  # noqa: E402
from sae_lens.config import SAETrainerConfig  # noqa: E402
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig  # noqa: E402
from sae_lens.training.sae_trainer import SAETrainer  # noqa: E402

args = parse_args()
c = CONFIGS[args.config]
torch.manual_seed(0)
sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=c["d"], d_sae=c["n"], k=c["k"], aux_loss_coefficient=1 / 32, device=args.device))
cfg = SAETrainerConfig(
    total_training_samples=10**9,
    train_batch_size_samples=c["batch"],
    lr=2e-4,
    lr_end=2e-4,
    device=args.device,
    autocast=args.dtype == "bf16",
    dead_feature_window=1000,
)
trainer = SAETrainer(cfg, sae, data_provider=iter(()))
dead = dead_mask(c["n"], args.auxk == "on", device=args.device)


def step(x):
    trainer.n_forward_passes_since_fired[dead] = 10**6
    trainer.step(x)


report("sae-lens", version("sae-lens"), time_steps(step, structured_batches(c["d"], c["n"], c["batch"], device=args.device), args.steps))
