"""What the hardware computes natively, for the choices that depend on it (model dtype, SAE bf16 GEMMs)."""

from __future__ import annotations

import platform
from functools import lru_cache


@lru_cache(maxsize=None)
def native_bf16(device_type: str) -> bool:
    """Whether bf16 matrix products run on bf16 hardware (CUDA; x86 AVX512-BF16 or AMX; Arm BF16).
    Elsewhere PyTorch emulates them at about a third of the fp32 speed, so a CPU we cannot inspect
    (outside Linux) counts as not native: fp32 is then never the slow choice."""
    if device_type != "cpu":
        return True
    if platform.system() != "Linux":
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read().split()
    except OSError:
        return False
    return any(f in flags for f in ("avx512_bf16", "amx_bf16", "bf16"))
