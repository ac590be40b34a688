"""One prompt's attribution graph built by saescope and by circuit-tracer (0.5.0), side by side in one run.

    nice -n 10 .venv/bin/python bench/circuit_tracer_compare.py [--transcoders DIR] [--ct-python ct-venv/bin/python]
        [--prompt "..."] [--max-feature-nodes N|all] [--batch-size 128] [--threads 1]

circuit-tracer lives in its own venv (its pins would disturb ours: transformers <= 4.57.3): `python3 -m venv
ct-venv && ct-venv/bin/pip install torch==2.13.0 && ct-venv/bin/pip install circuit-tracer==0.5.0
nnsight==0.7.0`. The nnsight pin is needed: circuit-tracer 0.5.0 asks for nnsight>=0.6.0, pip then takes 0.8.1, and
0.8.1 has no nnsight.intervention.tracing (replacement_model_nnsight.py:10 imports Barrier from it: ModuleNotFoundError).

What is exported (untimed, before either build): the bundled model as a local Hugging Face folder (save_pretrained of
the float32 model we load from the GGUF), and every layer's transcoder as one safetensors in the per-layer layout
circuit-tracer's loader reads (load_relu_transcoder: W_enc [d_sae, d], W_dec [d_sae, d], b_enc, b_dec, W_skip
[d_out, d_in]), taken from our loaded transcoders (the scale already folded: they take raw activations). Its nnsight
backend maps LlamaForCausalLM's "mlp.hook_in" to post_attention_layernorm's output and "mlp.hook_out" to the MLP's
output: the activations our transcoders read and predict. circuit-tracer's loaders give ReLU or JumpReLU only, so its
side (bench/peers/circuit_tracer_run.py) sets each transcoder's activation to TopK_k then ReLU after loading.

By design the two differ in one place: circuit-tracer prepends a special token when the prompt does not start with one
and zeroes every feature and error vector at position 0 (replacement_model_nnsight.py:221, :520;
single_layer_transcoder.py:166); saescope keeps position 0 (and `saescope trace` tokenizes without a BOS). Both builds
here get the same token ids (BOS first), so our graph has position-0 feature and error nodes theirs lacks. Edge weights
do not depend on which other nodes exist (an edge is the source's activation times its decoder row times the frozen
model's Jacobian times the target's encoder row), so the edges between nodes present in both graphs are compared:
features matched by (layer, position, index), error nodes at positions >= 1, token nodes, logits matched by token.

Tolerance: two weights agree when |a - b| <= rtol * |b| + atol with rtol = 1e-3 and atol = 1e-6 * max |edge| (float32,
different summation orders); relative differences |a - b| / max(|a|, |b|) are reported over edges whose magnitude is
at least 1e-4 of the largest edge (smaller ones are cancellation noise in float32).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sae_core import settings  # noqa: E402
from sae_core.circuits.attribution import AttributionConfig, attribute_with_model  # noqa: E402
from sae_core.circuits.prune import prune  # noqa: E402
from sae_core.circuits.scores import graph_scores  # noqa: E402
from sae_core.circuits.trace import transcoder_set  # noqa: E402
from sae_core.model import load_model  # noqa: E402

PROMPT = "The official language of the country whose capital is Madrid is"
DEMO_SET = settings.runs_dir() / "demo" / "transcoders"  # what `saescope demo --circuits` trains
RTOL, ATOL_SHARE, REL_FLOOR = 1e-3, 1e-6, 1e-4


def special_first(tokenizer, ids: list[int]) -> list[int]:
    """The prompt's ids as circuit-tracer feeds them: a special token first (BOS, else PAD, else EOS, else any special
    one; ids equal to 0 are skipped as its filter(None, ...) skips them), unless the prompt starts with one."""
    if ids and ids[0] in tokenizer.all_special_ids:
        return ids
    candidates = [tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id, *tokenizer.all_special_ids]
    first = next((c for c in candidates if c), None)
    return ids if first is None else [first, *ids]


def export(lm, transcoders: dict, out: Path) -> tuple[Path, list[str], int]:
    """The model as a local Hugging Face folder, the transcoders as circuit-tracer per-layer safetensors."""
    hf_dir = out / "hf"
    # loaded from a GGUF, the model carries transformers' GGUF quantizer, which refuses to save; its weights are the
    # dequantised float32 ones we use, so drop the marker (this process is done with the model)
    lm.model.hf_quantizer = None
    lm.model.save_pretrained(hf_dir, safe_serialization=True)
    lm.tokenizer.save_pretrained(hf_dir)
    # circuit-tracer 0.5.0 pins transformers <= 4.57.3; ours (5.x) writes rope settings as rope_parameters and the
    # tokenizer class as TokenizersBackend: add the 4.x spellings so its transformers reads the same model
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg["architectures"] = cfg.get("architectures") or [type(lm.model).__name__]
    cfg.pop("quantization_config", None)
    rope = cfg.get("rope_parameters") or {}
    if "rope_theta" not in cfg and "rope_theta" in rope:
        cfg["rope_theta"] = rope["rope_theta"]
        cfg.setdefault("rope_scaling", None if rope.get("rope_type", "default") == "default" else rope)
    cfg.setdefault("torch_dtype", "float32")
    (hf_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    tok_cfg = json.loads((hf_dir / "tokenizer_config.json").read_text())
    if tok_cfg.get("tokenizer_class") == "TokenizersBackend":
        tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        (hf_dir / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))
    paths, ks = [], set()
    for layer in sorted(transcoders):
        tc = transcoders[layer]
        tensors = {
            "W_enc": tc.W_enc.detach().float().cpu().contiguous(),  # [d_sae, d_in]: circuit-tracer's layout as ours
            "W_dec": tc.W_dec.detach().float().cpu().contiguous(),  # [d_sae, d_out]
            "b_enc": tc.b_enc.detach().float().cpu().contiguous(),
            "b_dec": tc.b_pre.detach().float().cpu().contiguous(),  # our b_pre is the output bias (SAELens' b_dec)
        }
        W_skip = getattr(tc, "W_skip", None)
        if W_skip is not None:
            tensors["W_skip"] = W_skip.detach().float().cpu().contiguous()  # [d_out, d_in]: both compute x @ W_skip.T
        path = out / f"layer_{layer}.safetensors"
        save_file(tensors, str(path))
        paths.append(str(path))
        ks.add(int(tc.cfg.k))
    if len(ks) != 1:
        raise SystemExit(f"the transcoders have different k: {sorted(ks)}")
    return hf_dir, paths, ks.pop()


def node_keys(n_feat_keys: list[tuple], n_layers: int, n_pos: int, logit_tokens: list[int]) -> list[tuple]:
    """A key per node in the shared node order: features, errors (layer-major), tokens, logits."""
    keys = [("f", *k) for k in n_feat_keys]
    keys += [("e", L, p) for L in range(n_layers) for p in range(n_pos)]
    keys += [("t", p) for p in range(n_pos)]
    keys += [("l", int(t)) for t in logit_tokens]
    return keys


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--transcoders", default=str(DEMO_SET))
    ap.add_argument("--ct-python", default=os.environ.get("CT_PYTHON", "ct-venv/bin/python"), help="circuit-tracer's venv python")
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--max-feature-nodes", default="all", help="a number, or 'all' (every active feature: full graphs)")
    ap.add_argument("--batch-size", type=int, default=128, help="targets per backward/transposed pass, both tools")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--workdir", default=None, help="export folder (default: a temporary one)")
    args = ap.parse_args()
    cap = None if args.max_feature_nodes == "all" else int(args.max_feature_nodes)
    torch.set_num_threads(args.threads)
    if not Path(args.ct_python).exists():
        raise SystemExit(f"no circuit-tracer venv at {args.ct_python}: see this file's docstring")

    tmp = tempfile.TemporaryDirectory(prefix="ct_compare_") if args.workdir is None else None
    work = Path(args.workdir or tmp.name)
    work.mkdir(parents=True, exist_ok=True)

    # ---------------------------------------------------------------- ours (in process)
    t0 = time.monotonic()
    tset = transcoder_set(args.transcoders)
    lm = load_model(tset.model, "cpu", "float32")
    transcoders = {layer: sae.to("cpu", torch.float32).eval() for layer, sae in tset.load().items()}
    t_loaded = time.monotonic()
    ids = special_first(lm.tokenizer, lm.tokenizer(args.prompt, add_special_tokens=False)["input_ids"])
    first_text = lm.tokenizer.decode([ids[0]])
    acfg = AttributionConfig(max_feature_nodes=cap, batch_size=args.batch_size)
    graph, rm = attribute_with_model(lm.model, transcoders, ids, acfg)
    with torch.no_grad():  # what circuit-tracer's loader alone (F.relu on our files) would make active, positions >= 1
        relu_active = sum(int((transcoders[L].pre_activations(s.mlp_in[1:]) > 0).sum()) for L, s in enumerate(rm.states))
    del rm
    t_attr = time.monotonic()
    pruned = prune(graph, 0.8, 0.98)
    ours_scores = graph_scores(graph)
    t_pruned = time.monotonic()
    ours_s = {"load": t_loaded - t0, "attribute": t_attr - t_loaded, "prune_and_score": t_pruned - t_attr}

    # ---------------------------------------------------------------- export (untimed), then circuit-tracer (subprocess)
    hf_dir, paths, k = export(lm, transcoders, work)
    n_layers = lm.n_layers
    del lm, transcoders
    spec = {
        "hf_dir": str(hf_dir),
        "transcoders": paths,
        "k": k,
        "tokens": ids,
        "batch_size": args.batch_size,
        "max_feature_nodes": cap,
        "max_n_logits": acfg.max_n_logits,
        "desired_logit_prob": acfg.desired_logit_prob,
        "node_threshold": 0.8,
        "edge_threshold": 0.98,
        "threads": args.threads,
        "out": str(work / "ct_graph.npz"),
    }
    (work / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
    t1 = time.monotonic()
    proc = subprocess.run(
        [args.ct_python, str(ROOT / "bench/peers/circuit_tracer_run.py"), str(work / "spec.json")],
        env=env,
        capture_output=True,
        text=True,
    )
    ct_wall = time.monotonic() - t1
    if proc.returncode != 0:
        print(proc.stdout[-4000:], proc.stderr[-8000:], sep="\n")
        raise SystemExit(f"circuit-tracer's run failed (exit {proc.returncode})")
    meta = json.loads(Path(spec["out"] + ".json").read_text())
    ct = np.load(spec["out"])

    # ---------------------------------------------------------------- compare
    T = len(ids)
    assert ct["input_tokens"].tolist() == ids, "circuit-tracer was given other token ids"
    ct_feats = ct["active_features"][ct["selected_features"]]
    ct_keys = node_keys([tuple(map(int, f)) for f in ct_feats], n_layers, T, ct["logit_tokens"].tolist())
    our_keys = node_keys([tuple(map(int, f)) for f in graph.features], n_layers, T, graph.logit_tokens)
    A_ct, A_ours = ct["adjacency"], graph.adjacency
    assert A_ct.shape == (len(ct_keys),) * 2 and A_ours.shape == (len(our_keys),) * 2

    # active features (all of them, not just the nodes kept under a cap)
    ours_active = {tuple(map(int, f)) for f in graph.features} if cap is None else None
    ct_active = {tuple(map(int, f)) for f in ct["active_features"]}
    # matched nodes: in both, error nodes at position 0 excluded (circuit-tracer zeroes them)
    ct_index = {key: i for i, key in enumerate(ct_keys)}
    pairs = [(i, ct_index[key]) for i, key in enumerate(our_keys) if key in ct_index and not (key[0] == "e" and key[2] == 0)]
    oi = np.array([p[0] for p in pairs])
    ci = np.array([p[1] for p in pairs])
    a = A_ours[np.ix_(oi, oi)].astype(np.float64)
    b = A_ct[np.ix_(ci, ci)].astype(np.float64)
    scale = max(np.abs(a).max(), np.abs(b).max())
    either = (a != 0) | (b != 0)
    ok = np.abs(a - b) <= RTOL * np.abs(b) + ATOL_SHARE * scale
    big = np.maximum(np.abs(a), np.abs(b)) >= REL_FLOOR * scale
    rel = np.abs(a - b)[big] / np.maximum(np.abs(a), np.abs(b))[big]
    # activations of matched features
    our_feat_idx = {key: i for i, key in enumerate(our_keys) if key[0] == "f"}
    ct_act = dict(zip((tuple(map(int, f)) for f in ct["active_features"]), ct["activation_values"].tolist()))
    act_rel = [
        abs(graph.activations[i] - ct_act[key[1:]]) / max(abs(ct_act[key[1:]]), 1e-30)
        for key, i in our_feat_idx.items()
        if key[1:] in ct_act
    ]
    # pruned graphs (same thresholds 0.8 / 0.98, same algorithm): kept feature nodes
    ours_kept = {our_keys[i] for i in np.nonzero(pruned.node_mask)[0] if our_keys[i][0] == "f"}
    ct_kept = {ct_keys[i] for i in np.nonzero(ct["node_mask"])[0] if ct_keys[i][0] == "f"}

    def counts(keys: list[tuple]) -> str:
        n = {c: sum(1 for key in keys if key[0] == c) for c in "fetl"}
        return f"{len(keys):,} nodes ({n['f']:,} features, {n['e']} errors, {n['t']} tokens, {n['l']} logits)"

    ct_s = meta["seconds"]
    print(f"prompt: {args.prompt!r}  ({T} tokens, first {ids[0]} = {first_text!r}, prepended as circuit-tracer does)")
    print(
        f"transcoders: {tset.folder} ({n_layers} layers, TopK k={k}, skip={meta['skip_transcoder']}); "
        f"circuit-tracer {meta['circuit_tracer']} (nnsight backend, loader gave {meta['loaded_activation']} -> set to TopK+ReLU), "
        f"torch {meta['torch']}; {args.threads} thread(s) each, batch {args.batch_size}, max_feature_nodes {args.max_feature_nodes}"
    )
    print()
    print(f"{'':32}{'saescope':>14}{'circuit-tracer':>16}{'ratio ct/ours':>15}")
    rows = [
        ("load model + transcoders (s)", ours_s["load"], ct_s["load"]),
        ("attribution graph (s)", ours_s["attribute"], ct_s["attribute"]),
        ("prune + scores (s)", ours_s["prune_and_score"], ct_s["prune_and_score"]),
        ("total in process (s)", sum(ours_s.values()), sum(v for n, v in ct_s.items() if n != "import")),
    ]
    for name, x, y in rows:
        print(f"{name:32}{x:14.2f}{y:16.2f}{y / x:15.2f}")
    print(f"{'circuit-tracer subprocess wall (s)':32}{'':14}{ct_wall:16.2f}   (incl. {ct_s['import']:.1f} s of imports)")
    print()
    print(f"saescope graph:       {counts(our_keys)}")
    print(f"circuit-tracer graph: {counts(ct_keys)}")
    if ours_active is not None:
        only_ours, only_ct = ours_active - ct_active, ct_active - ours_active
        at0 = sum(1 for f in only_ours if f[1] == 0)
        print(
            f"active features: saescope {len(ours_active):,}, circuit-tracer {len(ct_active):,}; matched (layer, pos, index) "
            f"{len(ours_active & ct_active):,}; only saescope {len(only_ours):,} ({at0:,} at position 0), "
            f"only circuit-tracer {len(only_ct):,}"
        )
    f_ours, f_ct = {kk for kk in our_keys if kk[0] == "f"}, {kk for kk in ct_keys if kk[0] == "f"}
    print(f"feature nodes: matched {len(f_ours & f_ct):,} of saescope {len(f_ours):,} / circuit-tracer {len(f_ct):,}")
    p_ours = [round(float(p), 4) for p in graph.logit_probabilities]
    p_ct = [round(float(p), 4) for p in ct["logit_probabilities"]]
    print(f"logits: saescope {graph.logit_tokens} p={p_ours}; circuit-tracer {ct['logit_tokens'].tolist()} p={p_ct}")
    n_topk = sum(1 for f in ct_active if f[1] >= 1)
    print(
        f"circuit-tracer's loader as shipped (F.relu, no k) would make {relu_active:,} features active at positions >= 1, "
        f"TopK+ReLU makes {n_topk:,}"
    )
    if act_rel:
        print(f"matched features' activations: max rel diff {max(act_rel):.2e}, median {np.median(act_rel):.2e}")
    print(
        f"edges between matched nodes ({len(pairs):,} nodes): {int(either.sum()):,} non-zero in either; "
        f"within tolerance (rtol {RTOL:g}, atol {ATOL_SHARE:g} x max|w| = {ATOL_SHARE * scale:.2e}): "
        f"{int((ok & either).sum()):,} ({(ok & either).sum() / max(either.sum(), 1):.4%}); "
        f"non-zero in one only: {int(((a != 0) ^ (b != 0)).sum()):,}"
    )
    print(
        f"  relative diff |a-b|/max(|a|,|b|) over the {int(big.sum()):,} edges >= {REL_FLOOR:g} x max|w|: "
        f"max {rel.max():.2e}, median {np.median(rel):.2e}; max |a-b| / max|w| over all: {np.abs(a - b).max() / scale:.2e}"
    )
    print(
        f"scores: saescope replacement {ours_scores.replacement:.4f} completeness {ours_scores.completeness:.4f}; "
        f"circuit-tracer replacement {meta['replacement_score']:.4f} completeness {meta['completeness_score']:.4f}"
    )
    print(
        f"pruned (0.8 / 0.98): kept features saescope {len(ours_kept):,}, circuit-tracer {len(ct_kept):,}, "
        f"in both {len(ours_kept & ct_kept):,} (saescope's at position 0: {sum(1 for kk in ours_kept if kk[2] == 0):,}); "
        f"edges saescope {pruned.n_edges:,}, circuit-tracer {int(ct['edge_count_pruned']):,}"
    )
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
