"""SAE architectures, one file each with its config beside it, and the registry that names them.

Every architecture implements base.DictionarySAE (encode, the training step returning base.StepLosses,
its save/load names, what the miner and the live runtime read); no stage outside this package asks for
an architecture's name (tests/test_sae_interface.py checks it).
"""

from __future__ import annotations

from .base import DictionarySAE, StepLosses
from .batchtopk import BatchTopKConfig, BatchTopKSAE
from .jumprelu import JumpReLUConfig, JumpReLUSAE
from .matryoshka import MatryoshkaConfig, MatryoshkaSAE
from .relu import ReluConfig, ReluSAE
from .topk import TopKConfig, TopKSAE, fvu
from .transcoder import SkipTranscoderSAE, TranscoderConfig, TranscoderSAE

# name (`saescope train --architecture`, the SAE's `architecture`): (config class, SAE class), as SAELens registers them
ARCHITECTURES: dict[str, tuple[type, type[DictionarySAE]]] = {
    cls.architecture: (config, cls)
    for config, cls in (
        (TopKConfig, TopKSAE),
        (ReluConfig, ReluSAE),
        (BatchTopKConfig, BatchTopKSAE),
        (JumpReLUConfig, JumpReLUSAE),
        (MatryoshkaConfig, MatryoshkaSAE),
        (TranscoderConfig, TranscoderSAE),
        (TranscoderConfig, SkipTranscoderSAE),
    )
}


def imported_architecture(fmt: str, name: str | None) -> str | None:
    """The registered architecture a checkpoint of format `fmt` ("saelens", "sparsify", "openai") that calls
    its architecture `name` (None: names none) loads as, by the names each architecture declares in
    `imports_from`; None when no architecture declares it."""
    for arch, (_, cls) in ARCHITECTURES.items():
        if name in cls.imports_from.get(fmt, ()):
            return arch
    return None


def imported_names(fmt: str) -> list[str]:
    """The architecture names format `fmt` has that load, in registry order (for error messages)."""
    return [name for _, cls in ARCHITECTURES.values() for name in cls.imports_from.get(fmt, ()) if name is not None]


__all__ = [
    "ARCHITECTURES",
    "BatchTopKConfig",
    "BatchTopKSAE",
    "DictionarySAE",
    "JumpReLUConfig",
    "JumpReLUSAE",
    "MatryoshkaConfig",
    "MatryoshkaSAE",
    "ReluConfig",
    "ReluSAE",
    "SkipTranscoderSAE",
    "StepLosses",
    "TopKConfig",
    "TopKSAE",
    "TranscoderConfig",
    "TranscoderSAE",
    "fvu",
    "imported_architecture",
    "imported_names",
]
