"""saescope core: everything that computes, as a library. The web app (`app/`) reads the store it writes;
the command line, the demo and serving sit on top (the `saescope` package, app/serving.py). `sae_core`
imports none of them, nor typer or rich.

Where each stage lives, in pipeline order; each takes a config (sae_core/config.py) and returns a result:

    model.py          load a causal LM; its layers, the hook, final norm and unembedding
    corpus.py         documents (demo corpus, text files, Hugging Face datasets) -> token windows
    windows.py        windows -> the model cut at the hook -> rows without the sink position
    shard_writer.py   the resumable sharded writer (and its folder format) the cache and the miner share
    cache.py          `saescope cache`: activations on disk; ActivationCache, the one reader of its shards
    stream.py         activations streamed from the model instead of a cache
    sae/              one file per architecture (TopK, BatchTopK, JumpReLU, Matryoshka, ReLU, the transcoder)
                      beside its config, behind the interface in sae/base.py and the registry in sae/__init__.py
    train.py          `saescope train`: the Trainer (init or resume, step, checkpoint)
    train_transcoders.py  `saescope train --transcoders`: one Trainer per layer, all stepping on one model pass
    evaluate.py       `saescope eval`: L0, FVU, dead fraction, downstream loss; metrics/: probe loss, ablation sparsity
    evaluation/       `saescope bench-sae`: the SAEBench metrics that hold up on CPU (issue 28)
    interchange.py    save and load SAEs: the one loader (ours, SAELens, sparsify, OpenAI) with its Provenance
    feature_stats.py  per-feature statistics and examples over the mined codes, in one sweep
    coactivation.py   which features fire on the same tokens, counted in that sweep
    mine.py           `saescope mine`: codes -> statistics -> store/
    store/            the SQL store (SQLite or PostgreSQL): schema, db (engine, migrations), write (publish a
                      mining run), codec (packed arrays), weights, explanation_search (full text, embeddings)
    explain/          `saescope explain`: each feature explained (n2g, llm), scored, embedded (explain/embed.py)
    relations/        `saescope map`, `saescope family`: the feature map, and families across SAE widths
    live/             features on your own text and steering: the runtime, interventions, sweeps, the model process
    circuits/         `saescope trace`: the replacement model, attribution, pruning, scores, supernodes, verification
    distributed/      torchrun: data- and latent-parallel training, checkpoints, the parts of a sharded mining run

Beneath them all: config.py (every option defined once, with options.py's plain metadata), settings.py
(the data directory), errors.py (SaescopeError), hardware.py (what the device computes natively).
Modules and subpackages import one another without circles (tests/test_layering.py).

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
