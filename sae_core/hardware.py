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


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


@lru_cache(maxsize=None)
def keep_large_buffers() -> bool:
    """Make glibc's allocator reuse freed large buffers instead of returning them to the system.

    A training step allocates and frees the same [1024, n_latents] encoder blocks (64 MB at 16,384
    latents) every time. Above its mmap threshold (at most 32 MB by default) glibc maps each one
    afresh and the first write to every page faults: about a fifth of config A's step time in
    bench/train_throughput.py. mallopt() is used rather than the MALLOC_*_ environment variables,
    which glibc reads once at start-up, before Python runs a line of ours. Returns whether it applied
    (glibc on Linux only; elsewhere nothing changes)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30) and libc.mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1))
