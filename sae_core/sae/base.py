"""What every SAE architecture here shares: the parameters, tied init and the unit-norm decoder
(`DictionaryParameters`), and the interface the trainer, the miner, evaluation, the loaders and the live
runtime use (`DictionarySAE`), so that none of them asks for an architecture's name.

Adding an architecture is one file beside the others: a config dataclass and a `DictionarySAE` subclass
that implements `encode` and `loss_and_grads` and declares its save/load names, registered in
`sae/__init__.py`'s ARCHITECTURES (tests/test_sae_interface.py trains and saves one defined in a test).
"""

from __future__ import annotations

import math
from abc import ABCMeta, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol

import torch
from torch import nn

from ..errors import SaescopeError
from ..hardware import native_bf16

GemmKind = torch.dtype | Literal["rounded"] | None  # bf16_gemm's choice: fp32, a bf16 GEMM, or fp32 over bf16-rounded operands


def bf16_gemm(enabled: bool, device_type: str) -> GemmKind:
    """How the encoder GEMM runs with the bf16 option: None (fp32), torch.bfloat16 (a bf16 GEMM, on
    bf16 hardware), or "rounded": an fp32 GEMM over bf16-rounded operands, whose result is then rounded
    to bf16. That gives the numbers a bf16 GEMM gives (fp32 accumulation) at fp32 speed, where PyTorch
    would emulate bf16 at about a third of it."""
    if not enabled:
        return None
    return torch.bfloat16 if native_bf16(device_type) else "rounded"


def gemm_operand(t: torch.Tensor, kind: GemmKind) -> torch.Tensor:
    """An encoder GEMM operand for `bf16_gemm`'s choice: as is, in bf16, or rounded to bf16 but held in fp32."""
    if kind is None:
        return t
    return t.bfloat16() if kind is torch.bfloat16 else t.bfloat16().float()


def gemm(a: torch.Tensor, b: torch.Tensor, kind: GemmKind) -> torch.Tensor:
    """a @ b as `bf16_gemm`'s choice computes it, like a matmul under bf16 autocast: bf16 operands, fp32
    accumulation, a bf16 result (held in fp32 for "rounded"). Operands already in that form pass as they are."""
    if kind is None:
        return a @ b
    out = gemm_operand(a, kind) @ gemm_operand(b, kind)
    return out if kind is torch.bfloat16 else out.bfloat16().float()


GroupSum = Callable[[torch.Tensor], torch.Tensor]  # the sum over the data-parallel ranks (topk.variance_sum)

ENCODE_BLOCK = 1024  # CPU: rows per encoder block in training (a [1024, 16384] fp32 block is 64 MB, cache-sized)
GPU_BLOCK_ELEMENTS = 2**28  # GPU: blocks of up to 1 GB of fp32 (a whole batch of 4096 x 32768): fewer, larger launches


def encode_block_rows(device_type: str, n_latents: int) -> int:
    """Rows per encoder block of a training step over `n_latents` columns (ENCODE_BLOCK, GPU_BLOCK_ELEMENTS)."""
    return ENCODE_BLOCK if device_type == "cpu" else max(ENCODE_BLOCK, GPU_BLOCK_ELEMENTS // n_latents)


@dataclass
class StepLosses:
    """What one `loss_and_grads` call reports, besides the gradients it sets.

    Floats are read back from the device once per step. With data parallelism (`group_sum`) loss, fvu and
    aux_fvu are this rank's share of the global batch's (data_parallel.reduce_step sums them)."""

    loss: float  # the whole objective
    fvu: float  # the main reconstruction's fraction of variance unexplained (Matryoshka: the whole dictionary's)
    l0: float  # mean active latents per position
    n_dead: int  # latents counted dead for this step (all of them under latent parallelism)
    fired: torch.Tensor  # bool [n_latents] (this rank's latents): latents active in the batch, on its device
    aux_fvu: float = 0.0  # AuxK's normalised error; 0 for architectures without AuxK


class StepFn(Protocol):
    """The training step's signature: `DictionarySAE.loss_and_grads` and its compiled form."""

    def __call__(self, x: torch.Tensor, dead: torch.Tensor, autocast_bf16: bool = ..., group_sum: GroupSum | None = ...) -> StepLosses: ...


class DictionaryParameters(nn.Module):
    """Parameters W_enc [n, d], b_enc [n], W_dec [n, d] (unit-norm rows), b_pre [d]; cfg has d_in, n_latents.
    What the trainer does to any SAE besides its step: init, the decoder's constraint, the learning rate."""

    def __init__(self, cfg: Any):
        super().__init__()
        self.cfg = cfg
        n, d = cfg.n_latents, cfg.d_in
        self.W_enc = nn.Parameter(torch.empty(n, d))  # row i: encoder direction of latent i
        self.b_enc = nn.Parameter(torch.zeros(n))
        self.W_dec = nn.Parameter(torch.empty(n, d))  # row i: unit-norm decoder direction of latent i
        self.b_pre = nn.Parameter(torch.zeros(d))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Tied init: random unit-norm decoder rows, encoder = decoder transposed."""
        self.W_dec.copy_(torch.randn(self.W_dec.shape, generator=generator))
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True))
        self.W_enc.copy_(self.W_dec)
        self.b_enc.zero_()

    @torch.no_grad()
    def remove_parallel_grads(self) -> None:
        """Drop from each decoder row's gradient its component along the row (it would only change the norm)."""
        if self.W_dec.grad is not None:  # one pass each, no [n, d] temporaries: 122 -> 65 ms at 32,768 x 768 on a 2-core CPU
            parallel = torch.linalg.vecdot(self.W_dec.grad, self.W_dec)
            self.W_dec.grad.addcmul_(parallel.unsqueeze(1), self.W_dec, value=-1)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))

    def bias_init_rows(self, sample: torch.Tensor) -> torch.Tensor:
        """The rows of a sample of training batches whose geometric median b_pre starts at (the inputs; a
        transcoder's batch holds its targets too, and its b_pre is theirs)."""
        return sample

    def begin_step(self, step: int) -> None:
        """Called by the trainer before each step's `loss_and_grads` with the steps done so far (JumpReLU's
        L0 warm-up reads it); most architectures ignore it."""

    def lr_default(self) -> float:
        return paper_lr(self.cfg.n_latents)

    def loss_and_grads(
        self, x: torch.Tensor, dead: torch.Tensor, autocast_bf16: bool = False, group_sum: GroupSum | None = None
    ) -> StepLosses:
        """Compute the loss of batch x, set every parameter's .grad, and report the statistics.

        `dead`: bool mask [n_latents] of latents that have not fired for the dead threshold. `autocast_bf16`:
        the encoder GEMM in bf16 (`bf16_gemm`). `group_sum`: data parallel, x is this rank's part of the
        batch and the loss's denominators are the whole batch's (topk.variance_sum)."""
        raise NotImplementedError(f"{type(self).__name__} defines no training step")

    def gather(self) -> DictionarySAE:
        """The whole SAE this module trains, for saving: itself, or a latent-parallel slice's group gathered
        (a collective call: every rank of the group makes it)."""
        raise NotImplementedError(f"{type(self).__name__} does not say which SAE it trains")


def paper_lr(n_latents: int) -> float:
    """The paper's width-scaled learning rate (Gao et al. 2024): 2e-4 / sqrt(n_latents / 2^14)."""
    return 2e-4 / math.sqrt(n_latents / 2**14)


class DictionarySAE(DictionaryParameters, metaclass=ABCMeta):
    """One SAE architecture: what the trainer, the miner, evaluation, the loaders and the live runtime ask of it.

    Names, declared by each subclass:
      architecture          its name in the registry (`saescope train --architecture`), also saved under
                            metadata.saescope.architecture
      saelens_architecture  the `architecture` its SAELens folder says (what SAELens' inference SAE for it is)
      imports_from          format -> the names that format gives this architecture, for the importers of
                            foreign checkpoints: "saelens" (cfg.json's architecture), "sparsify" (cfg.json's
                            activation), "openai" (the state dict's activation); None: what a checkpoint
                            of that format that names none is
    """

    architecture: ClassVar[str] = ""
    saelens_architecture: ClassVar[str] = ""
    imports_from: ClassVar[dict[str, tuple[str | None, ...]]] = {}
    # our parameter -> its SAELens tensor (W_enc is saved transposed, [d_in, d_sae], as SAELens holds it)
    saelens_weights: ClassVar[dict[str, str]] = {"W_enc": "W_enc", "W_dec": "W_dec", "b_enc": "b_enc", "b_pre": "b_dec"}
    THRESHOLD_NAMES: ClassVar[tuple[str, ...]] = ("threshold", "topk_threshold")  # saved, and SAELens' BatchTopK training name

    # ------------------------------------------------------------------ inference (the miner, evaluation, the live runtime)

    @abstractmethod
    def encode(self, x: torch.Tensor, k: int | None = None) -> torch.Tensor:
        """Dense latent activations [..., n_latents] at inference; `k` (fixed-width codes only) overrides the trained k."""

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The reconstruction [..., d_in] of dense codes z [..., n_latents]."""
        return z @ self.W_dec + self.b_pre

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction of x."""
        return self.decode(self.encode(x))

    def fixed_code_width(self) -> int | None:
        """k when every position's code holds at most k latents by construction (TopK overrides this), else None."""
        return None

    def code_width(self, max_active: int) -> int:
        """Latents kept per position when codes are stored (mining): TopK's k, otherwise up to `max_active`."""
        return self.fixed_code_width() or min(max_active, self.cfg.n_latents)

    def encoder_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W [n_latents, d_in], bias [n_latents]) with pre-activations = x @ W.T + bias, for encoders that fold
        the input's centring into the bias (the miner): b_enc - W_enc b_pre here; a transcoder centres nothing."""
        return self.W_enc, self.b_enc - self.W_enc @ self.b_pre

    def activation_thresholds(self) -> torch.Tensor | None:
        """Per-latent value a pre-activation must exceed to fire at inference ([n_latents]); None: 0 (ReLU, TopK)."""
        return None

    # ------------------------------------------------------------------ training

    @abstractmethod
    def loss_and_grads(
        self, x: torch.Tensor, dead: torch.Tensor, autocast_bf16: bool = False, group_sum: GroupSum | None = None
    ) -> StepLosses:
        """See DictionaryParameters.loss_and_grads: set every parameter's .grad for batch x, report StepLosses."""

    def gather(self) -> DictionarySAE:
        return self

    def compiled_step(self) -> StepFn | None:
        """This SAE's step as one compiled graph (`train --compile`), or None where the architecture has none."""
        return None

    # ------------------------------------------------------------------ save and load (interchange.py)

    def saelens_cfg_fields(self) -> dict:
        """cfg.json fields SAELens' inference SAE of this architecture reads besides the shapes (TopK: k)."""
        return {}

    def saelens_tensors(self, scale: float) -> dict[str, torch.Tensor]:
        """The SAELens tensors of this SAE taking inputs divided by `scale` (1: as trained), on the CPU."""
        # the scale is folded in on the CPU: a GPU divides by multiplying with the reciprocal, one ulp off in places,
        # and the saved file should not depend on where the SAE was trained
        names = self.saelens_weights
        W_enc, W_dec, b_enc, b_pre = (t.detach().float().cpu() for t in (self.W_enc, self.W_dec, self.b_enc, self.b_pre))
        tensors = {names["W_enc"]: W_enc.T.contiguous(), names["W_dec"]: W_dec.contiguous(), names["b_enc"]: b_enc / scale}
        tensors[names["b_pre"]] = b_pre / scale
        thresholds = self.activation_thresholds()
        if thresholds is not None:
            tensors[self.THRESHOLD_NAMES[0]] = (thresholds.detach().float().cpu() / scale).contiguous()
        return tensors

    @torch.no_grad()
    def load_saelens_tensors(self, w: dict[str, torch.Tensor], W_enc_nd: torch.Tensor, where: str | Path) -> None:
        """Set the parameters from SAELens tensors `w` (W_enc given as [n, d] in `W_enc_nd`), checking shapes."""
        for name, saved in self.saelens_weights.items():
            value = W_enc_nd if name == "W_enc" else w[saved]
            target = getattr(self, name)
            if tuple(value.shape) != tuple(target.shape):
                raise SaescopeError(f"{where}: {name} has shape {tuple(value.shape)}, expected {tuple(target.shape)}")
            target.copy_(value.float())
        self.load_thresholds(w, where)

    def load_thresholds(self, w: dict[str, torch.Tensor], where: str | Path) -> None:
        """Set the inference thresholds from saved tensors (architectures that have them override this)."""

    def saved_threshold(self, w: dict[str, torch.Tensor], where: str | Path) -> torch.Tensor:
        """The threshold tensor among saved ones (float64, CPU, flat), or an error saying it is missing."""
        for name in self.THRESHOLD_NAMES:
            if w.get(name) is not None:
                return w[name].detach().double().cpu().reshape(-1)
        raise SaescopeError(f"{where}: a {self.architecture} SAE's weights must hold its threshold")

    @classmethod
    def k_setting(cls, k: Any) -> Any:
        """A checkpoint's k as this architecture's config takes it (a whole number; BatchTopK's may be fractional)."""
        return int(k)

    @classmethod
    def saelens_import_settings(cls, cfg: dict, w: dict[str, torch.Tensor], where: str | Path) -> dict:
        """Config settings from a foreign SAELens cfg.json besides k (Matryoshka: its widths); checks the folder."""
        return {}
