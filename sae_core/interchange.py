"""Save and load SAEs: the one loader every stage uses (`load_sae`), for our folders, SAELens folders,
sparsify folders and OpenAI state dicts, with a typed record of where the SAE came from (`Provenance`).

Our folder (readable by SAELens' `SAE.load_from_disk`):
    cfg.json                  d_in, d_sae, architecture (SAELens' name: "topk", "standard" or "jumprelu"), k,
                              dtype, normalize_activations "none", apply_b_dec_to_input, metadata{...},
                              and our own record under metadata.saescope: the training run, and which of our
                              architectures it is with its settings (`architecture`, `sae_config`)
    sae_weights.safetensors   W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_enc [d_sae], b_dec [d_in],
                              threshold [d_sae] (JumpReLU, BatchTopK, Matryoshka)

BatchTopK and Matryoshka BatchTopK are saved as SAELens saves them after training: "jumprelu" SAEs with
every latent's threshold at the one estimated in training (SAELens registers "batchtopk" and
"matryoshka_batchtopk" for training only). Their SAELens training folders load too (`topk_threshold`).

Which names are written and read is each architecture's declaration (sae/base.py DictionarySAE:
`saelens_architecture`, `saelens_cfg_fields`, `saelens_weights`, `imports_from`); this module only
knows the formats.

Saved weights take raw activations: training scales inputs by s (unit mean squared norm), and
saving folds s into the biases (b_enc / s, b_pre / s) and thresholds (threshold / s). TopK, ReLU and
JumpReLU commute with a positive scale, so the saved SAE gives latents z / s, i.e. in raw units, with
the same unit-norm decoder.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import load, load_file, save, save_file

from .errors import SaescopeError
from .sae import ARCHITECTURES, imported_architecture, imported_names
from .sae.base import DictionarySAE

CFG = "cfg.json"
WEIGHTS = "sae_weights.safetensors"


def _tensors(sae: DictionarySAE, scale: float) -> dict[str, torch.Tensor]:
    """The SAELens tensors of `sae` taking inputs divided by `scale` (1: as trained): the architecture names them."""
    return sae.saelens_tensors(scale)


def _architecture_record(sae: DictionarySAE) -> dict:
    """cfg.json's fields saying which architecture `sae` is: SAELens' (architecture, and the fields its
    inference SAE reads such as TopK's k) and ours under metadata.saescope (`architecture`, `sae_config`:
    its settings besides the shapes)."""
    settings = {k: v for k, v in dataclasses.asdict(sae.cfg).items() if k not in ("d_in", "n_latents")}
    record: dict = {"architecture": sae.saelens_architecture, "saescope": {"architecture": sae.architecture, "sae_config": settings}}
    return {**record, **sae.saelens_cfg_fields()}


def save_sae(sae: DictionarySAE, folder: Path, scale: float = 1.0, metadata: dict | None = None) -> Path:
    """Write `sae` (trained on inputs multiplied by `scale`) as a SAELens folder taking raw inputs."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = dict(metadata or {})
    cache_cfg = meta.get("cache", {})
    tensors = _tensors(sae, scale)
    arch = _architecture_record(sae)
    meta.update(arch.pop("saescope"))
    cfg = {
        **arch,
        "d_in": sae.cfg.d_in,
        "d_sae": sae.cfg.n_latents,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": arch.get("apply_b_dec_to_input", True),  # a transcoder's b_dec is its output's bias only
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "model_name": cache_cfg.get("model"),
            "hook_name": cache_cfg.get("hook"),
            "context_size": cache_cfg.get("context_size"),
            "prepend_bos": False,
            "dataset_path": cache_cfg.get("corpus"),
            "sae_lens_training_version": None,
            "saescope": meta,
        },
    }
    tmp = folder / (WEIGHTS + ".tmp")
    save_file(tensors, str(tmp))
    tmp.replace(folder / WEIGHTS)
    (folder / (CFG + ".tmp")).write_text(json.dumps(cfg, indent=2, default=str))
    (folder / (CFG + ".tmp")).replace(folder / CFG)
    return folder


def _build(
    arch: str, d_in: int, n: int, settings: dict, w: dict[str, torch.Tensor], W_enc_nd: torch.Tensor, where: str | Path
) -> DictionarySAE:
    """Our SAE of architecture `arch` with these settings (its config's fields; others are ignored) and
    weights: W_enc as [n, d], the rest by their SAELens names in `w` (threshold where the architecture has one)."""
    if arch not in ARCHITECTURES:
        raise SaescopeError(f"{where}: unsupported SAE architecture {arch!r}: saescope reads {', '.join(ARCHITECTURES)}")
    config_cls, sae_cls = ARCHITECTURES[arch]
    names = {f.name for f in dataclasses.fields(config_cls)}
    if "k" in names and settings.get("k") is None:
        raise SaescopeError(f"{where}: a {arch} SAE's checkpoint must say its k")
    sae = sae_cls(config_cls(d_in=d_in, n_latents=n, **{k: v for k, v in settings.items() if k in names - {"d_in", "n_latents"}}))
    sae.load_saelens_tensors(w, W_enc_nd, where)  # the architecture's weight names, and its thresholds where it has them
    return sae.eval()


@dataclass(frozen=True)
class Provenance:
    """What an SAE was trained on, read from its cfg.json (ours under metadata.saescope, SAELens' fields
    otherwise), with one rule per field for every stage."""

    model: str | None  # the model it reads (None: unknown; `saescope import --model` sets it)
    hook: str | None  # blocks.<L>.hook_resid_post
    corpus: str  # corpus spec it was trained on ("demo" when the checkpoint does not say)
    context_size: int  # tokens per window
    skip_positions: int  # leading positions per window never trained on (the attention sink)
    seed: int  # document order of the corpus
    trained_windows: int  # corpus windows used for training: evaluation holds out the ones after them
    activations: str | None  # the training cache's folder; None when streamed, imported or unknown
    source_format: str  # saescope, saelens, sparsify or openai

    def require(self, where: str | Path) -> tuple[str, str]:
        """(model, hook), or an error naming the missing field and the command that fixes it."""
        missing = [name for name, field_ in (("model", "metadata.model_name"), ("hook", "metadata.hook_name")) if not getattr(self, name)]
        if missing:
            fields = " and ".join(
                f"which {m} it reads ({f})" for m, f in (("model", "metadata.model_name"), ("hook", "metadata.hook_name")) if m in missing
            )
            raise SaescopeError(
                f"{where}/cfg.json does not say {fields}; give them with "
                f"`saescope import {where} --out NEW_FOLDER --model NAME --hook blocks.<L>.hook_resid_post`"
            )
        assert self.model is not None and self.hook is not None
        return self.model, self.hook

    def as_metadata(self) -> dict:
        """The metadata.saescope record `save_sae` writes, from which `provenance` reads this back."""
        cache = {
            "model": self.model,
            "hook": self.hook,
            "corpus": self.corpus,
            "context_size": self.context_size,
            "skip_positions": self.skip_positions,
            "seed": self.seed,
        }
        return {"cache": cache, "cache_windows": self.trained_windows, "activations": self.activations}


def provenance(cfg: dict, model: str | None = None, hook: str | None = None) -> Provenance:
    """The provenance recorded in a SAELens-style cfg dict; `model` and `hook` override it."""
    meta = cfg.get("metadata") or {}
    ours = meta.get("saescope") or {}
    cache = ours.get("cache") or {}
    imported = (ours.get("imported_from") or {}).get("format")
    activations = ours.get("activations")
    streamed = bool(cache.get("streamed")) or activations == "streamed from the model"
    return Provenance(
        model=model or cache.get("model") or meta.get("model_name") or cfg.get("model_name"),
        hook=hook or meta.get("hook_name") or cache.get("hook") or cfg.get("hook_name"),
        corpus=cache.get("corpus") or meta.get("dataset_path") or cfg.get("dataset_path") or "demo",
        context_size=int(cache.get("context_size") or meta.get("context_size") or cfg.get("context_size") or 128),
        skip_positions=int(cache.get("skip_positions", 1)),
        seed=int(cache.get("seed", 0)),
        trained_windows=int(ours.get("cache_windows") or 0),
        activations=None if streamed or not activations else str(activations),
        # the architecture record alone (which sae_bytes adds to any SAE) does not make an SAE ours
        source_format=imported or ("saescope" if set(ours) - {"architecture", "sae_config"} else "saelens"),
    )


class LoadedSAE(NamedTuple):
    """What `load_sae` returns: unpacks as (sae, cfg); `.provenance` says where the SAE came from."""

    sae: DictionarySAE
    cfg: dict  # SAELens-style cfg.json content (built for sparsify and OpenAI checkpoints)

    @property
    def provenance(self) -> Provenance:
        return provenance(self.cfg)

    @property
    def training(self) -> dict:
        """Our training record (options, steps, final statistics); empty for SAEs trained elsewhere."""
        return ((self.cfg.get("metadata") or {}).get("saescope") or {}).get("training") or {}


def _load_saelens(folder: Path) -> LoadedSAE:
    return _from_saelens(json.loads((folder / CFG).read_text()), load_file(str(folder / WEIGHTS)), folder)


def _from_saelens(cfg: dict, w: dict[str, torch.Tensor], where: str | Path) -> LoadedSAE:
    saelens_arch = cfg.get("architecture", "standard")  # SAELens' default
    ours = (cfg.get("metadata") or {}).get("saescope") or {}
    settings = dict(ours.get("sae_config") or {})
    saved_by_us = ARCHITECTURES.get(ours.get("architecture") or "")
    if saved_by_us is not None and saved_by_us[1].saelens_architecture == saelens_arch:
        arch = ours["architecture"]  # saved by us: e.g. a BatchTopK SAE SAELens reads as "jumprelu"
    elif (found := imported_architecture("saelens", saelens_arch)) is not None:
        arch = found  # SAELens' own; its BatchTopK training folders keep k, matryoshka_widths and topk_threshold
        settings.update(ARCHITECTURES[arch][1].saelens_import_settings(cfg, w, where))
    else:
        supported = sorted({cls.saelens_architecture for _, cls in ARCHITECTURES.values()})  # what SAELens' inference SAEs are
        raise SaescopeError(f"{where}: architecture {saelens_arch!r} is not supported ({', '.join(supported)})")
    if cfg.get("normalize_activations", "none") not in ("none", None):
        raise SaescopeError(
            f"{where}: normalize_activations={cfg['normalize_activations']!r} is not supported; fold it into the weights first"
        )
    k = cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k") or settings.get("k")
    if k is not None:
        settings["k"] = ARCHITECTURES[arch][1].k_setting(k)
    return LoadedSAE(_build(arch, cfg["d_in"], cfg["d_sae"], settings, w, w["W_enc"].T, where), cfg)


def sae_bytes(loaded: LoadedSAE) -> bytes:
    """Any loaded SAE as one self-contained safetensors file: our folder's tensors, with its cfg.json in the
    file's metadata (what the store keeps per mining run; `load_sae_bytes` reads it back)."""
    sae = loaded.sae
    tensors = {name: t.contiguous() for name, t in _tensors(sae, 1.0).items()}
    arch = _architecture_record(sae)
    meta = dict(loaded.cfg.get("metadata") or {})
    meta["saescope"] = {**(meta.get("saescope") or {}), **arch.pop("saescope")}
    cfg = {**loaded.cfg, **arch, "d_in": sae.cfg.d_in, "d_sae": sae.cfg.n_latents, "metadata": meta}
    return save(tensors, metadata={CFG: json.dumps(cfg, default=str)})


def load_sae_bytes(data: bytes, where: str = "stored SAE weights") -> LoadedSAE:
    """The SAE in a file `sae_bytes` wrote (the safetensors header is 8 bytes of length, then JSON)."""
    try:
        header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
        cfg = json.loads(header["__metadata__"][CFG])
        tensors = load(data)
    except (ValueError, KeyError, TypeError) as exc:
        raise SaescopeError(f"{where} are not a safetensors file with its cfg.json ({exc})") from exc
    return _from_saelens(cfg, tensors, where)


def _imported_cfg(sae: DictionarySAE, fmt: str, src: Path, extra: dict | None = None) -> dict:
    arch = _architecture_record(sae)
    meta = {"imported_from": {"format": fmt, "path": str(src), **(extra or {})}, "cache": {}, **arch.pop("saescope")}
    return {
        **arch,
        "d_in": sae.cfg.d_in,
        "d_sae": sae.cfg.n_latents,
        "metadata": {"saescope": meta},
    }


def _load_sparsify(folder: Path) -> LoadedSAE:
    cfg = json.loads((folder / CFG).read_text()) if (folder / CFG).exists() else {}
    w = load_file(str(folder / "sae.safetensors"))
    n, d = w["encoder.weight"].shape
    k = cfg.get("k")
    if k is None:
        raise SaescopeError(f"{folder}/cfg.json has no k; sparsify folders need their cfg.json")
    arch = imported_architecture("sparsify", cfg.get("activation"))
    if arch is None:
        supported = ", ".join(imported_names("sparsify"))
        raise SaescopeError(f"{folder}: sparsify activation {cfg.get('activation')!r} is not supported ({supported})")
    sae = _build(
        arch, d, n, {"k": int(k)}, {"W_dec": w["W_dec"], "b_enc": w["encoder.bias"], "b_dec": w["b_dec"]}, w["encoder.weight"], folder
    )
    return LoadedSAE(sae, _imported_cfg(sae, "sparsify", folder, {"cfg": cfg}))


def _load_openai(path: Path) -> LoadedSAE:
    state = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(state, dict) or "encoder.weight" not in state:
        raise SaescopeError(f"{path} is not an OpenAI sparse_autoencoder state_dict (no encoder.weight)")
    n, d = state["encoder.weight"].shape
    act = state.get("activation")  # the package's default: ReLU
    arch = imported_architecture("openai", act)
    if arch is None:
        raise SaescopeError(f"{path}: activation {act!r} is not supported ({', '.join(imported_names('openai'))})")
    k = (state.get("activation_state_dict") or {}).get("k")
    k = None if k is None else int(k)
    if state.get("normalize"):
        raise SaescopeError(f"{path} normalises its inputs with a layer norm, which saescope SAEs do not model")
    weights = {"W_dec": state["decoder.weight"].T, "b_enc": state["latent_bias"], "b_dec": state["pre_bias"]}
    sae = _build(arch, d, n, {"k": k}, weights, state["encoder.weight"], path)
    return LoadedSAE(sae, _imported_cfg(sae, "openai", path))


def load_sae(src: str | Path) -> LoadedSAE:
    """Load an SAE taking raw activations from our folder, a SAELens folder, a sparsify folder
    (cfg.json + sae.safetensors) or an OpenAI sparse_autoencoder state dict (.pt)."""
    src = Path(src)
    if src.is_dir() and (src / WEIGHTS).exists() and (src / CFG).exists():
        return _load_saelens(src)
    if src.is_dir() and (src / "sae.safetensors").exists():
        return _load_sparsify(src)
    if src.is_file() and src.suffix in (".pt", ".pth", ".bin"):
        return _load_openai(src)
    if not src.exists():
        raise SaescopeError(f"{src} does not exist")
    raise SaescopeError(f"{src} is not a SAELens folder (needs {CFG} and {WEIGHTS}), a sparsify folder or an OpenAI .pt checkpoint")


def import_checkpoint(src: str | Path, out: str | Path, model: str | None = None, hook: str | None = None) -> Path:
    """Convert any checkpoint `load_sae` reads into our folder, keeping (or setting) its provenance."""
    sae, cfg = load_sae(src)
    prov = provenance(cfg, model=model, hook=hook)
    meta = {**prov.as_metadata(), "imported_from": {"format": prov.source_format, "path": str(Path(src).resolve())}}
    if training := ((cfg.get("metadata") or {}).get("saescope") or {}).get("training"):
        meta["training"] = training
    return save_sae(sae, Path(out), scale=1.0, metadata=meta)
