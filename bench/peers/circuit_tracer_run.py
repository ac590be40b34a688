"""circuit-tracer's side of bench/circuit_tracer_compare.py: run in circuit-tracer's own venv (it imports nothing of
saescope), build one prompt's attribution graph with circuit-tracer, write it as an .npz.

    ct-venv/bin/python bench/peers/circuit_tracer_run.py SPEC.json

SPEC.json (written by the compare script):
    hf_dir             a local Hugging Face folder of the model (LlamaForCausalLM), loaded offline
    transcoders        one safetensors per layer, circuit-tracer's per-layer layout (load_relu_transcoder's keys):
                       W_enc [d_sae, d_model], W_dec [d_sae, d_model], b_enc [d_sae], b_dec [d_model], W_skip [d_model, d_model]
    k                  the transcoders' TopK k (circuit-tracer's loaders give ReLU or JumpReLU only: see below)
    tokens             the prompt's token ids (BOS first: circuit-tracer's ensure_tokenized keeps them as they are)
    batch_size, max_feature_nodes, max_n_logits, desired_logit_prob, node_threshold, edge_threshold, threads
    out                where to write the .npz

The transcoders go through circuit-tracer's own loader (utils.hf_utils.load_transcoders with a local config: model_kind
"transcoder_set", feature_input_hook "mlp.hook_in", feature_output_hook "mlp.hook_out", the nnsight mapping of
LlamaForCausalLM). That loader picks F.relu when a file has no "activation_function.threshold"
(transcoder/single_layer_transcoder.py:468-472) and no loader ever builds its TopK module
(transcoder/activation_functions.py:53-62), which moreover keeps negative values among the top k. Our transcoders are
ReLU(TopK_k(.)), so after loading we set each transcoder's `activation_function` (a plain attribute,
single_layer_transcoder.py:86, called at :125 and :164) to TopK then ReLU.
"""

from __future__ import annotations

import json
import os
import sys
import time

T_START = time.monotonic()

spec = json.load(open(sys.argv[1]))
threads = int(spec.get("threads", 1))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

torch.set_num_threads(threads)

import circuit_tracer  # noqa: E402
from circuit_tracer import ReplacementModel, attribute  # noqa: E402
from circuit_tracer.graph import compute_graph_scores, prune_graph  # noqa: E402
from circuit_tracer.transcoder.activation_functions import TopK  # noqa: E402
from circuit_tracer.utils.hf_utils import load_transcoders  # noqa: E402

T_IMPORTED = time.monotonic()


class TopKThenReLU(nn.Module):
    """ReLU(TopK_k(pre-activations)) along the last axis: what saescope's transcoders compute."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.topk = TopK(k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.topk(x))


cpu = torch.device("cpu")
config = {
    "model_kind": "transcoder_set",
    "feature_input_hook": "mlp.hook_in",
    "feature_output_hook": "mlp.hook_out",
    "transcoders": list(spec["transcoders"]),
    "scan": "saescope-export",
}
transcoders = load_transcoders(config, device=cpu, dtype=torch.float32, lazy_encoder=False, lazy_decoder=False)
loaded_activation = type(transcoders.transcoders[0].activation_function).__name__
for tc in transcoders.transcoders:
    tc.activation_function = TopKThenReLU(int(spec["k"]))
model = ReplacementModel.from_pretrained_and_transcoders(spec["hf_dir"], transcoders, backend="nnsight", device=cpu, dtype=torch.float32)
T_LOADED = time.monotonic()

tokens = torch.tensor(spec["tokens"], dtype=torch.long)
graph = attribute(
    tokens,
    model,
    max_n_logits=int(spec["max_n_logits"]),
    desired_logit_prob=float(spec["desired_logit_prob"]),
    batch_size=int(spec["batch_size"]),
    max_feature_nodes=spec["max_feature_nodes"],
)
T_ATTRIBUTED = time.monotonic()

pruned = prune_graph(graph, node_threshold=float(spec["node_threshold"]), edge_threshold=float(spec["edge_threshold"]))
replacement, completeness = compute_graph_scores(graph)
T_PRUNED = time.monotonic()

np.savez(
    spec["out"],
    input_tokens=np.asarray(graph.input_tokens.cpu().numpy(), dtype=np.int64),
    active_features=graph.active_features.cpu().numpy().astype(np.int64),
    activation_values=graph.activation_values.detach().cpu().float().numpy(),
    selected_features=graph.selected_features.cpu().numpy().astype(np.int64),
    adjacency=graph.adjacency_matrix.cpu().float().numpy(),
    logit_tokens=graph.logit_token_ids.cpu().numpy().astype(np.int64),
    logit_probabilities=graph.logit_probabilities.cpu().float().numpy(),
    node_mask=pruned.node_mask.cpu().numpy(),
    edge_count_pruned=np.asarray(int(pruned.edge_mask.sum())),
)
json.dump(
    {
        "circuit_tracer": circuit_tracer.__version__,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "loaded_activation": loaded_activation,
        "zero_positions": str(model.zero_positions),
        "skip_transcoder": bool(model.skip_transcoder),
        "seconds": {
            "import": T_IMPORTED - T_START,
            "load": T_LOADED - T_IMPORTED,
            "attribute": T_ATTRIBUTED - T_LOADED,
            "prune_and_score": T_PRUNED - T_ATTRIBUTED,
        },
        "replacement_score": replacement,
        "completeness_score": completeness,
    },
    open(spec["out"] + ".json", "w"),
)
