"""saescope core: everything that computes. The web app (`app/`) only reads the store it writes.

The pipeline, one module per stage, each a config in (sae_core/config.py) and a result out:

    model.py          load a causal LM; its layers, the hook, final norm and unembedding
    corpus.py         documents (demo corpus, text files, Hugging Face datasets) -> token windows
    windows.py        windows -> the model cut at the hook -> rows without the sink position
    shard_writer.py   the resumable sharded writer the cache and the miner share
    cache.py          `saescope cache`: activations on disk; ActivationCache reads them back
    stream.py         activations streamed from the model instead of a cache
    sae/              one file per SAE architecture (TopK, BatchTopK, JumpReLU, Matryoshka, ReLU) beside its config
    train.py          `saescope train`: the Trainer (init or resume, step, checkpoint)
    evaluate.py       `saescope eval`: L0, FVU, dead fraction, downstream loss
    interchange.py    the one SAE loader (ours, SAELens, sparsify, OpenAI) with its Provenance
    feature_stats.py  per-feature statistics and examples over the mined codes
    mine.py           `saescope mine`: codes -> statistics -> store/ (SQLite or PostgreSQL)

The command line, the demo and serving sit on top, in the `saescope` package (saescope/cli.py,
saescope/demo.py) and in `app/` (app/serving.py); `sae_core` imports neither of them, nor typer or rich.

Each stage's entry point is its module's function of the same name (sae_core.train.train,
sae_core.evaluate.evaluate, sae_core.mine.mine). Public names below are
imported lazily, so `import sae_core` loads no torch:
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "CacheConfig": "config",
    "TrainConfig": "config",
    "EvalConfig": "config",
    "StatsConfig": "config",
    "MineConfig": "config",
    "ServeConfig": "config",
    "DemoConfig": "config",
    "SaescopeError": "errors",
    "LanguageModel": "model",
    "load_model": "model",
    "WindowSource": "windows",
    "WindowBatch": "windows",
    "build_cache": "cache",
    "ActivationCache": "cache",
    "CacheResult": "cache",
    "ModelStream": "stream",
    "Trainer": "train",
    "TrainResult": "train",
    "StepResult": "train",
    "EvalResult": "evaluate",
    "load_sae": "interchange",
    "save_sae": "interchange",
    "import_checkpoint": "interchange",
    "Provenance": "interchange",
    "MineResult": "mine",
}
__all__ = ["__version__", *_EXPORTS]
__doc__ = (__doc__ or "") + "    " + ", ".join(_EXPORTS) + "\n"


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'sae_core' has no attribute {name!r}")
