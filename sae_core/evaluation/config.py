"""`saescope bench-sae`'s options: BenchConfig lives with every stage's config in sae_core/config.py."""

from ..config import BenchConfig

__all__ = ["BenchConfig"]
