"""Shared fixtures: a tiny random Llama and a tokenizer built in-process, and a small text corpus.

Nothing here touches a model hub or the network; the model is saved as an ordinary Hugging Face
folder so the tests exercise the same `from_pretrained` path users take.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

WORDS = ("the cat dog bird sat ran flew over under a big small red blue house tree river city king queen "
         "said that and but when then why how seven eight nine ten one two three money ship whale sea").split()


def make_corpus(folder: Path, n_docs: int = 40, words_per_doc: int = 300, seed: int = 0) -> Path:
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for d in range(n_docs):
        sentences = []
        for _ in range(words_per_doc // 10):
            sentences.append(" ".join(rng.choice(WORDS) for _ in range(10)).capitalize() + ".")
        (folder / f"doc_{d:03d}.txt").write_text(" ".join(sentences))
    return folder


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
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(fast), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=512, eos_token_id=fast.eos_token_id, bos_token_id=None,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


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
