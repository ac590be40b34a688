"""dictionary-learning: `TopKTrainer.update` (its public trainer class) of an `AutoEncoderTopK`.

Dead latents: the trainer counts `num_tokens_since_fired` against `dead_feature_threshold`; the
driver sets that counter for 10% of latents before every step. Warm-up step 0 (geometric-median
init of b_dec) is one of the two untimed steps. bf16 wraps `update` in torch.autocast.
"""

import contextlib
import sys
from importlib.metadata import version
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CONFIGS, dead_mask, parse_args, report, structured_batches, time_steps  # noqa: E402
from dictionary_learning.trainers.top_k import TopKTrainer  # noqa: E402

args = parse_args()
c = CONFIGS[args.config]
trainer = TopKTrainer(
    steps=10**6, activation_dim=c["d"], dict_size=c["n"], k=c["k"], layer=0, lm_name="bench", seed=0, device=args.device, warmup_steps=0
)
dead = dead_mask(c["n"], args.auxk == "on", device=args.device)
autocast = (
    (lambda: torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16)) if args.dtype == "bf16" else contextlib.nullcontext
)
state = {"step": 0}


def step(x):
    trainer.num_tokens_since_fired[dead] = trainer.dead_feature_threshold + 1
    with autocast():
        trainer.update(state["step"], x)
    state["step"] += 1


report(
    "dictionary-learning",
    version("dictionary-learning"),
    time_steps(step, structured_batches(c["d"], c["n"], c["batch"], device=args.device), args.steps),
)
