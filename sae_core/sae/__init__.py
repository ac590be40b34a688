"""SAE architectures, one file each with its config beside it."""

from .relu import ReluConfig, ReluSAE
from .topk import TopKConfig, TopKSAE, fvu

ARCHITECTURES = {"topk": (TopKConfig, TopKSAE), "relu": (ReluConfig, ReluSAE)}

__all__ = ["ARCHITECTURES", "ReluConfig", "ReluSAE", "TopKConfig", "TopKSAE", "fvu"]
