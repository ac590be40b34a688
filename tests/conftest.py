"""Shared fixtures: a tiny random Llama and a tokenizer built in-process, and a small text corpus.

Nothing here touches a model hub or the network; the model is saved as an ordinary Hugging Face
folder so the tests exercise the same `from_pretrained` path users take.
"""

from __future__ import annotations

import random
import shutil
import uuid
from pathlib import Path

import pytest

WORDS = ("the cat dog bird sat ran flew over under a big small red blue house tree river city king queen "
         "said that and but when then why how seven eight nine ten one two three money ship whale sea").split()


# The browser tests drive Debian's chromium (Playwright); screenshots of what they saw land here.
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "browser"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def browser():
    """One chromium per test module (module scope: Playwright's sync API must not outlive the module's tests)."""
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (.ci/run installs Debian's chromium with apt)")
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


def tiny_cache(lm, model: Path, corpus: Path, out: Path, tokens: int = 32 * 64) -> Path:
    """An fp32 activation cache of the tiny model at blocks.1 (32-token windows), for training tests."""
    from sae_core.cache import CacheConfig, build_cache

    cfg = CacheConfig(
        model=str(model),
        corpus=str(corpus),
        hook="blocks.1.hook_resid_post",
        context_size=32,
        tokens=tokens,
        batch_size=8,
        windows_per_shard=16,
        dtype="float32",
        device="cpu",
        model_dtype="float32",
    )
    build_cache(cfg, out, lm=lm, progress=False)
    return out


def make_corpus(folder: Path, n_docs: int = 40, words_per_doc: int = 300, seed: int = 0) -> Path:
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for d in range(n_docs):
        sentences = []
        for _ in range(words_per_doc // 10):
            sentences.append(" ".join(rng.choice(WORDS) for _ in range(10)).capitalize() + ".")
        (folder / f"doc_{d:03d}.txt").write_text(" ".join(sentences))
    return folder


TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)


def make_tiny_model(folder: Path, corpus: Path, hidden: int = 64, layers: int = 4, seed: int = 0) -> Path:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([str(p) for p in sorted(corpus.glob("*.txt"))], trainer)
    from tokenizers import decoders
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")
    fast.chat_template = TINY_CHAT_TEMPLATE  # the live chat turn (the bundled instruct model has its own)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(fast), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=512, eos_token_id=fast.eos_token_id, bos_token_id=None,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


# Tests of the compute path run on every device here: the CPU always, and a CUDA GPU where one answers
# (CI has none; the CUDA cases are run on a GPU machine: see bench/RESULTS.md, "CUDA").
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not _cuda_available(), reason="no CUDA GPU on this machine"))]


# Thread counts the resume and reproducibility tests run at: 8 makes PyTorch and MKL split reductions
# and GEMMs among threads as a workstation's 16 cores do, which a 2-core CI would otherwise never see
# (issue 26). Oversubscribing 2 cores with 8 threads is slow but computes the same numbers.
THREAD_COUNTS = [1, 8]


@pytest.fixture(params=THREAD_COUNTS, ids=lambda n: f"{n}-threads")
def threads(request):
    """torch.set_num_threads(n) for the test, restored afterwards; a subprocess gets n through cli_at and threads_env."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def cli_at(threads: int, *args: str) -> list[str]:
    """The saescope CLI in a process computing with `threads` torch threads. OMP_NUM_THREADS alone is not
    enough: torch caps it at the CPUs it sees (8 gave 2 threads on a 2-core machine)."""
    import sys

    return [sys.executable, "-c", f"import torch; torch.set_num_threads({threads}); from saescope.cli import main; main()", *args]


def threads_env(threads: int) -> dict[str, str]:
    """The environment for `cli_at`: OpenMP threads sleep while they wait (spinning, 8 threads on 2 cores
    made a training step 30x slower). It changes no number a run computes."""
    import os

    return {**os.environ, "OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE"}


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, tiny_corpus) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"), tiny_corpus)


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    """Every test writes under its own SAESCOPE_HOME; the demo corpus download is shared across tests."""
    monkeypatch.setenv("SAESCOPE_HOME", str(tmp_path / "home"))
    shared = Path(__file__).resolve().parent.parent / ".saescope" / "corpus"
    monkeypatch.setattr("sae_core.settings.corpus_dir", lambda: shared)


@pytest.fixture(scope="session")
def tiny_lm(tiny_model):
    from sae_core.model import load_model

    return load_model(str(tiny_model), device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def tiny_sae_dir(tiny_lm, tiny_model, tiny_corpus, tmp_path_factory) -> Path:
    """A TopK SAE (128 latents, k 6) trained on the tiny model's layer 1, with an eval.json."""
    import json

    from sae_core.cache import CacheConfig, build_cache
    from sae_core.train import TrainConfig, train

    root = tmp_path_factory.mktemp("tiny-sae")
    cfg = CacheConfig(model=str(tiny_model), corpus=str(tiny_corpus), hook="blocks.1.hook_resid_post", context_size=32,
                      tokens=32 * 64, batch_size=8, windows_per_shard=16, dtype="float32", device="cpu", model_dtype="float32")
    build_cache(cfg, root / "cache", lm=tiny_lm, progress=False)
    train(TrainConfig(n_latents=128, k=6, batch_size=128, tokens=128 * 80, lr=2e-3), root / "cache", root / "tiny-sae", progress=False)
    (root / "tiny-sae" / "eval.json").write_text(json.dumps({"tokens": 1000, "l0": 6.0, "fvu": 0.31, "ce_score": 0.8, "delta_ce": 0.2,
                                                             "kl": 0.1, "dead_fraction": 0.02, "rare_fraction": 0.05}))
    return root / "tiny-sae"


@pytest.fixture(scope="session")
def tc_dir(tiny_lm, tiny_model, tiny_corpus, tmp_path_factory) -> Path:
    """A transcoder for every layer of the tiny model, trained once for the graph tests (test_trace, test_graph_build),
    which only read it (test_live_transcoder trains its own single layer)."""
    from sae_core.config import CacheConfig, TrainConfig
    from sae_core.train_transcoders import train_transcoders

    stream = CacheConfig(model=str(tiny_model), corpus=str(tiny_corpus), hook="blocks.0.hook_resid_post", context_size=32, tokens=32 * 48)
    cfg = TrainConfig(n_latents=64, k=4, batch_size=128, lr=3e-3, checkpoint_every=100, device="cpu")
    return train_transcoders(cfg, stream, "all", tmp_path_factory.mktemp("tc") / "tc", progress=False, lm=tiny_lm).out


def mine_tiny(sae_dir, lm, url: str, windows: int = 96):
    from sae_core.feature_stats import StatsConfig
    from sae_core.mine import MineConfig, mine

    stats = StatsConfig(top_n=8, n_intervals=4, per_interval=3, histogram_bins=10, context_before=5, context_after=3)
    return mine(sae_dir, MineConfig(tokens=32 * windows, stats=stats, batch_size=8, windows_per_chunk=16, db=url,
                                    device="cpu", model_dtype="float32"), lm=lm, progress=False)


@pytest.fixture(scope="session")
def mined_store(tiny_sae_dir, tiny_lm, tmp_path_factory) -> str:
    """URL of a SQLite store holding the tiny SAE's mining run (shared by the app and browser tests)."""
    url = f"sqlite:///{tmp_path_factory.mktemp('store') / 'store.db'}"
    mine_tiny(tiny_sae_dir, tiny_lm, url)
    return url


PG_URL = "postgresql://postgres@127.0.0.1:5432/test"   # the local server of our machines and CI (trust auth)


def pg_url_or_skip() -> str:
    from sqlalchemy import create_engine, text

    try:
        engine = create_engine("postgresql+psycopg://postgres@127.0.0.1:5432/test", connect_args={"connect_timeout": 3})
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        engine.dispose()  # the server allows 100 connections; a pooled one per test would use them up
    except Exception as exc:  # noqa: BLE001 - any failure to connect means "no server here"
        pytest.skip(f"no PostgreSQL answers at 127.0.0.1:5432 (database test): {exc.__class__.__name__}")
    return PG_URL


@pytest.fixture
def pg_url():
    """A fresh schema in the local PostgreSQL's `test` database, dropped afterwards."""
    from sqlalchemy import create_engine, text

    pg_url_or_skip()
    schema = f"t_{uuid.uuid4().hex[:10]}"
    admin = create_engine("postgresql+psycopg://postgres@127.0.0.1:5432/test")
    with admin.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    yield f"{PG_URL}?options=-csearch_path%3D{schema}"
    with admin.begin() as conn:
        conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
    admin.dispose()


class LiveServer:
    """An app served by uvicorn on a free port of 127.0.0.1, in a thread of the test process."""

    def __init__(self, app):
        import socket
        import threading
        import time

        import uvicorn

        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        sock.close()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.time() + 20
        while not self._server.started and time.time() < deadline:
            time.sleep(0.05)
        assert self._server.started, "the test server did not start"

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
