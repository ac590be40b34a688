"""SAE architectures, one file each with its config beside it."""

from .batchtopk import BatchTopKConfig, BatchTopKSAE
from .jumprelu import JumpReLUConfig, JumpReLUSAE
from .matryoshka import MatryoshkaConfig, MatryoshkaSAE
from .relu import ReluConfig, ReluSAE
from .topk import TopKConfig, TopKSAE, fvu

# name (`saescope train --architecture`, the SAE's `architecture`): (config class, SAE class)
ARCHITECTURES: dict[str, tuple[type, type]] = {
    "topk": (TopKConfig, TopKSAE),
    "relu": (ReluConfig, ReluSAE),
    "batchtopk": (BatchTopKConfig, BatchTopKSAE),
    "jumprelu": (JumpReLUConfig, JumpReLUSAE),
    "matryoshka_batchtopk": (MatryoshkaConfig, MatryoshkaSAE),
}

__all__ = [
    "ARCHITECTURES",
    "BatchTopKConfig",
    "BatchTopKSAE",
    "JumpReLUConfig",
    "JumpReLUSAE",
    "MatryoshkaConfig",
    "MatryoshkaSAE",
    "ReluConfig",
    "ReluSAE",
    "TopKConfig",
    "TopKSAE",
    "fvu",
]
