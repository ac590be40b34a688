"""Save and load SAEs as SAELens folders; import sparsify and OpenAI checkpoints.

Our folder (readable by SAELens' `SAE.load_from_disk`):
    cfg.json                  d_in, d_sae, architecture ("topk" or "standard"), k, dtype,
                              normalize_activations "none", apply_b_dec_to_input, metadata{...},
                              and our own training record under metadata.saescope
    sae_weights.safetensors   W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_enc [d_sae], b_dec [d_in]

Saved weights take raw activations: training scales inputs by s (unit mean squared norm), and
saving folds s into the biases (b_enc / s, b_pre / s). TopK and ReLU commute with a positive
scale, so the saved SAE gives latents z / s, i.e. in raw units, with the same unit-norm decoder.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import SaescopeError
from .sae import ReluConfig, ReluSAE, TopKConfig, TopKSAE

CFG = "cfg.json"
WEIGHTS = "sae_weights.safetensors"
SAELENS_ARCH = {"topk": "topk", "relu": "standard"}


def save_sae(sae, folder: Path, scale: float = 1.0, metadata: dict | None = None) -> Path:
    """Write `sae` (trained on inputs multiplied by `scale`) as a SAELens folder taking raw inputs."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = dict(metadata or {})
    cache_cfg = meta.get("cache", {})
    # the scale is folded in on the CPU: a GPU divides by multiplying with the reciprocal, one ulp off in places,
    # and the saved file should not depend on where the SAE was trained
    W_enc, W_dec, b_enc, b_pre = (t.detach().float().cpu() for t in (sae.W_enc, sae.W_dec, sae.b_enc, sae.b_pre))
    tensors = {"W_enc": W_enc.T.contiguous(), "W_dec": W_dec.contiguous(), "b_enc": b_enc / scale, "b_dec": b_pre / scale}
    cfg = {"architecture": SAELENS_ARCH[sae.architecture], "d_in": sae.cfg.d_in, "d_sae": sae.cfg.n_latents,
           "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True, "normalize_activations": "none",
           "reshape_activations": "none",
           "metadata": {"model_name": cache_cfg.get("model"), "hook_name": cache_cfg.get("hook"),
                        "context_size": cache_cfg.get("context_size"), "prepend_bos": False,
                        "dataset_path": cache_cfg.get("corpus"), "sae_lens_training_version": None,
                        "saescope": meta}}
    if sae.architecture == "topk":
        cfg["k"] = sae.cfg.k
    tmp = folder / (WEIGHTS + ".tmp")
    save_file(tensors, str(tmp))
    tmp.replace(folder / WEIGHTS)
    (folder / (CFG + ".tmp")).write_text(json.dumps(cfg, indent=2, default=str))
    (folder / (CFG + ".tmp")).replace(folder / CFG)
    return folder


def _build(arch: str, d_in: int, n: int, k: int | None, W_enc_nd, W_dec_nd, b_enc, b_pre):
    if arch == "topk":
        sae = TopKSAE(TopKConfig(d_in=d_in, n_latents=n, k=int(k)))
    elif arch == "relu":
        sae = ReluSAE(ReluConfig(d_in=d_in, n_latents=n))
    else:
        raise SaescopeError(f"unsupported SAE architecture {arch!r}: saescope reads topk and standard (ReLU) SAEs")
    with torch.no_grad():
        for name, value in (("W_enc", W_enc_nd), ("W_dec", W_dec_nd), ("b_enc", b_enc), ("b_pre", b_pre)):
            target = getattr(sae, name)
            if tuple(value.shape) != tuple(target.shape):
                raise SaescopeError(f"{name} has shape {tuple(value.shape)}, expected {tuple(target.shape)}")
            target.copy_(value.float())
    return sae.eval()


def load_sae(folder: str | Path) -> tuple[TopKSAE | ReluSAE, dict]:
    """Load a SAELens-layout folder (ours or SAELens') -> (SAE taking raw activations, cfg dict)."""
    folder = Path(folder)
    if not (folder / CFG).exists() or not (folder / WEIGHTS).exists():
        raise SaescopeError(f"{folder} is not an SAE folder (needs {CFG} and {WEIGHTS})")
    cfg = json.loads((folder / CFG).read_text())
    w = load_file(str(folder / WEIGHTS))
    arch = {"topk": "topk", "standard": "relu"}.get(cfg.get("architecture", "standard"))
    if arch is None:
        raise SaescopeError(f"{folder}: architecture {cfg.get('architecture')!r} is not supported (topk, standard)")
    if cfg.get("normalize_activations", "none") not in ("none", None):
        raise SaescopeError(f"{folder}: normalize_activations={cfg['normalize_activations']!r} is not supported; fold it into the weights first")
    k = cfg.get("k") or cfg.get("activation_fn_kwargs", {}).get("k")
    sae = _build(arch, cfg["d_in"], cfg["d_sae"], k, w["W_enc"].T, w["W_dec"], w["b_enc"], w["b_dec"])
    return sae, cfg


def import_checkpoint(src: str | Path, out: str | Path, model: str | None = None, hook: str | None = None) -> Path:
    """Convert a SAELens folder, a sparsify folder or an OpenAI state_dict (.pt) into our folder."""
    src, out = Path(src), Path(out)
    if not src.exists():
        raise SaescopeError(f"{src} does not exist")
    if src.is_dir() and (src / WEIGHTS).exists():
        sae, cfg = load_sae(src)
        meta = cfg.get("metadata", {}) or {}
        meta_out = {"imported_from": {"format": "saelens", "path": str(src)},
                    "cache": {"model": model or meta.get("model_name") or cfg.get("model_name"),
                              "hook": hook or meta.get("hook_name") or cfg.get("hook_name"),
                              "context_size": meta.get("context_size") or cfg.get("context_size")}}
    elif src.is_dir() and (src / "sae.safetensors").exists():
        cfg = json.loads((src / CFG).read_text()) if (src / CFG).exists() else {}
        w = load_file(str(src / "sae.safetensors"))
        n, d = w["encoder.weight"].shape
        k = cfg.get("k")
        if k is None:
            raise SaescopeError(f"{src}/cfg.json has no k; sparsify folders need their cfg.json")
        sae = _build("topk", d, n, k, w["encoder.weight"], w["W_dec"], w["encoder.bias"], w["b_dec"])
        meta_out = {"imported_from": {"format": "sparsify", "path": str(src), "cfg": cfg},
                    "cache": {"model": model, "hook": hook}}
    elif src.suffix in (".pt", ".pth", ".bin"):
        state = torch.load(src, map_location="cpu", weights_only=False)
        if not isinstance(state, dict) or "encoder.weight" not in state:
            raise SaescopeError(f"{src} is not an OpenAI sparse_autoencoder state_dict (no encoder.weight)")
        n, d = state["encoder.weight"].shape
        act = state.get("activation", "ReLU")
        if act == "TopK":
            k = int(state["activation_state_dict"]["k"])
            arch = "topk"
        elif act == "ReLU":
            k, arch = None, "relu"
        else:
            raise SaescopeError(f"{src}: activation {act!r} is not supported (TopK, ReLU)")
        if state.get("normalize"):
            raise SaescopeError(f"{src} normalises its inputs with a layer norm, which saescope SAEs do not model")
        sae = _build(arch, d, n, k, state["encoder.weight"], state["decoder.weight"].T, state["latent_bias"], state["pre_bias"])
        meta_out = {"imported_from": {"format": "openai", "path": str(src)}, "cache": {"model": model, "hook": hook}}
    else:
        raise SaescopeError(f"{src} is not a SAELens folder, a sparsify folder or an OpenAI .pt checkpoint")
    return save_sae(sae, out, scale=1.0, metadata=meta_out)
