"""Feature absorption, first-letter task (Chanin et al. 2024, "A is for Absorption"; SAEBench's
absorption eval, sae_bench/evals/absorption/), measured only where it can mean something.

1. The probe first. Words of the model's vocabulary that are one token (a space and letters) are read
   at the hook, at the word's position in SAEBench's in-context prompt ("{word} has the first letter:"
   after a few solved examples; the model is causal, so what follows the word never changes it). A
   multinomial logistic probe (sklearn) is fitted on 80% of the words and scored on the rest: per
   letter F1, and their mean. SAEBench assumes an accurate probe (it recommends models of 2B+); below
   `min_f1` (0.8 by default) absorption is not computed and `absorption_valid` is False, with the F1.
2. Where it is accurate: per letter, the main latents are the top-k by mean difference (letter vs the
   rest) on the train words, k growing from 1 while the k-sparse probe's test F1 rises by more than
   0.03 (SAEBench's f1_jump_threshold) up to 10; then, on each test word of that letter the model's
   probe gets right, SAEBench's absorption fraction (the share of the probe direction's projection
   carried by up to 3 other latents of decoder cosine >= 0.1 with the probe instead of the main ones)
   and full absorption (no main latent fires and one other latent carries >= 40% of the projection),
   with SAEBench's thresholds (feature_absorption_calculator.py).
"""

from __future__ import annotations

import string
import warnings
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:
    from sklearn.linear_model import LogisticRegression

    from ..model import LanguageModel
    from ..sae.base import DictionarySAE

ICL_WORDS = (" tape", " house", " river", " blue", " garden")  # solved examples before each word (never scored)
TEMPLATE = "{word} has the first letter:{answer}\n"
F1_JUMP = 0.03
MAX_K = 10
ABSORBER_COS = 0.1  # absorption fraction: an absorbing latent's decoder cosine with the probe at least this
FULL_COS = 0.025  # full absorption: the top projecting latent's cosine at least this
PROJ_SHARE = 0.4  # ... and its share of the probe projection at least this
MAX_ABSORBERS = 3
EPS = 1e-8
MIN_WORDS_PER_LETTER = 10


def vocabulary_words(tokenizer: Any, n: int, seed: int) -> list[tuple[int, str]]:  # a transformers tokenizer (decode typed str | list)
    """(token id, word) of up to `n` single-token words: a leading space, then 2+ ASCII letters."""
    icl = {w.strip().lower() for w in ICL_WORDS}
    found = []
    for token_id in range(len(tokenizer)):
        text = tokenizer.decode([token_id])
        word = text[1:]
        if text.startswith(" ") and len(word) >= 2 and word.isascii() and word.isalpha() and word.lower() not in icl:
            found.append((token_id, text))
    rng = np.random.default_rng(seed)
    pick = rng.permutation(len(found))[:n]
    return [found[i] for i in sorted(pick)]


def _prefix_ids(lm: LanguageModel) -> list[int]:
    prefix = "".join(TEMPLATE.format(word=w, answer=" " + w.strip()[0].upper()) for w in ICL_WORDS)
    bos = [lm.tokenizer.bos_token_id] if getattr(lm.tokenizer, "bos_token_id", None) is not None else []
    return bos + lm.tokenizer(prefix, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def word_activations(lm: LanguageModel, layer: int, words: list[tuple[int, str]], batch: int = 256) -> torch.Tensor:
    """Each word's activation at the hook, read at its position after the in-context examples. The
    shared prefix runs once; each batch of words runs one position against a copy of its key/value
    cache (the same numbers as the whole prompt, ~40x less model work; tests check it)."""
    import copy

    from ..model import _StopForward

    base = lm.model.base_model
    prefix = torch.tensor([_prefix_ids(lm)], device=lm.device)
    cache = base(input_ids=prefix, use_cache=True).past_key_values
    captured: list = []

    def grab(_module: nn.Module, _inputs: tuple[Any, ...], output: torch.Tensor | tuple[torch.Tensor, ...]) -> NoReturn:
        captured.append(output[0] if isinstance(output, tuple) else output)
        raise _StopForward

    out = []
    handle = lm.layers[layer].register_forward_hook(grab)
    try:
        for lo in range(0, len(words), batch):
            ids = torch.tensor([[t] for t, _ in words[lo : lo + batch]], device=lm.device)
            past = copy.deepcopy(cache)
            past.batch_repeat_interleave(len(ids))
            try:
                with warnings.catch_warnings():  # transformers 5 renames past_key_values to cache; 4.46 (our floor) knows only this
                    warnings.filterwarnings("ignore", message=".*past_key_values.*", category=FutureWarning)
                    base(input_ids=ids, past_key_values=past, use_cache=True)
            except _StopForward:
                pass
            out.append(captured.pop()[:, -1].float().cpu())
    finally:
        handle.remove()
    return torch.cat(out)


@torch.no_grad()
def word_activations_full(lm: LanguageModel, layer: int, words: list[tuple[int, str]], batch: int = 64) -> torch.Tensor:
    """`word_activations` by running each whole prompt (the reference the cached path is checked against)."""
    prefix = _prefix_ids(lm)
    out = []
    for lo in range(0, len(words), batch):
        ids = torch.tensor([prefix + [t] for t, _ in words[lo : lo + batch]])
        out.append(lm.residuals(ids, layer)[:, -1].float().cpu())
    return torch.cat(out)


def _f1(pred: np.ndarray, truth: np.ndarray) -> float:
    tp = float((pred & truth).sum())
    return 0.0 if tp == 0 else 2 * tp / (float(pred.sum()) + float(truth.sum()))


def _fit(x: np.ndarray, y: np.ndarray, multinomial: bool = False) -> LogisticRegression:
    from sklearn.linear_model import LogisticRegression

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LogisticRegression(C=1.0, max_iter=1000).fit(x, y)


def first_letter_probe(x: np.ndarray, letters: np.ndarray, seed: int) -> tuple[LogisticRegression, np.ndarray, dict[str, float]]:
    """The probe, its train/test split, and per-letter test F1 (letters with test words)."""
    rng = np.random.default_rng(seed)
    test = rng.permutation(len(x)) < len(x) // 5
    probe = _fit(x[~test], letters[~test])
    pred = probe.predict(x[test])
    f1 = {}
    for c in np.unique(letters[test]):
        f1[string.ascii_lowercase[c]] = _f1(pred == c, letters[test] == c)
    return probe, test, f1


@torch.no_grad()
def absorption_metrics(
    lm: LanguageModel, layer: int, sae: DictionarySAE, n_words: int, min_f1: float, seed: int
) -> tuple[dict[str, float], bool, dict]:
    """(metrics, absorption_valid, details)."""
    words = vocabulary_words(lm.tokenizer, n_words, seed)
    letters = np.array([string.ascii_lowercase.index(w.strip()[0].lower()) for _, w in words])
    x = word_activations(lm, layer, words)
    probe, test, f1 = first_letter_probe(x.numpy(), letters, seed)
    mean_f1 = float(np.mean(list(f1.values())))
    details: dict = {"words": len(words), "probe_f1_per_letter": f1, "min_f1": min_f1}
    metrics = {"absorption_first_letter_probe_f1": mean_f1}
    if mean_f1 < min_f1:
        details["skipped"] = (
            f"the model's first-letter probe reaches mean F1 {mean_f1:.3f} at this hook, below {min_f1}: "
            "absorption would measure the probe's errors, not the SAE"
        )
        return metrics, False, details
    device = sae.W_enc.device
    z = torch.cat([sae.encode(x[i : i + 1024].to(device)).float().cpu() for i in range(0, len(x), 1024)]).numpy()
    W_dec = sae.W_dec.detach().float().cpu()
    classes = list(probe.classes_)
    per_letter = []
    for c in np.unique(letters):
        name = string.ascii_lowercase[c]
        pos_train, pos_test = (letters == c) & ~test, (letters == c) & test
        if pos_train.sum() < MIN_WORDS_PER_LETTER or pos_test.sum() < 2 or c not in classes:
            continue
        ytr, yte = (letters[~test] == c), (letters[test] == c)
        diff = np.abs(z[~test][ytr].mean(0) - z[~test][~ytr].mean(0))
        order = np.argsort(-diff, kind="stable")
        main, best = [], -1.0
        for k in range(1, MAX_K + 1):
            cols = order[:k]
            f = _f1(_fit(z[~test][:, cols], ytr).predict(z[test][:, cols]).astype(bool), yte)
            if k > 1 and f - best <= F1_JUMP:
                break
            main, best = cols.tolist(), f
        direction = torch.from_numpy(probe.coef_[classes.index(c)]).float()
        direction = direction / direction.norm()
        cos = torch.nn.functional.cosine_similarity(direction.unsqueeze(0), W_dec, dim=-1)
        # the probe's true positives among the test words of this letter
        hits = np.flatnonzero(test & (letters == c))
        hits = hits[probe.predict(x.numpy()[hits]) == c]
        fractions, full = [], 0
        for i in hits:
            act_proj = float(x[i] @ direction)
            lat_proj = torch.from_numpy(z[i]) * cos
            main_proj = float(lat_proj[main].sum())
            mask = torch.ones(len(cos), dtype=torch.bool)
            mask[main] = False
            mask &= (cos >= ABSORBER_COS) & (lat_proj > 0)
            absorbers = lat_proj[mask]
            top = float(absorbers.topk(min(MAX_ABSORBERS, absorbers.numel())).values.sum()) if absorbers.numel() else 0.0
            if main_proj >= act_proj or act_proj <= 0 or top / act_proj < PROJ_SHARE:
                fraction = 0.0
            elif main_proj <= 0:
                fraction = 1.0
            else:
                absorbed = min(top, act_proj - main_proj)
                fraction = float(np.clip(absorbed / (absorbed + main_proj), 0, 1))
            fractions.append(fraction)
            top_latent = int(lat_proj.argmax())
            if (
                all(z[i][m] < EPS for m in main)
                and float(cos[top_latent]) >= FULL_COS
                and act_proj > 0
                and float(lat_proj[top_latent]) / act_proj >= PROJ_SHARE
            ):
                full += 1
        if not len(hits):
            continue
        per_letter.append(
            {
                "first_letter": name,
                "mean_absorption_fraction": float(np.mean(fractions)),
                "full_absorption_rate": full / len(hits),
                "num_full_absorption": full,
                "num_probe_true_positives": len(hits),
                "num_split_features": len(main),
                "main_latents": main,
                "main_latent_f1": best,
            }
        )
    details["letters"] = per_letter
    if per_letter:
        metrics["absorption_fraction"] = float(np.mean([r["mean_absorption_fraction"] for r in per_letter]))
        metrics["absorption_full_fraction"] = float(np.mean([r["full_absorption_rate"] for r in per_letter]))
        metrics["absorption_num_split_features"] = float(np.mean([r["num_split_features"] for r in per_letter]))
        metrics["absorption_main_latent_f1"] = float(np.mean([r["main_latent_f1"] for r in per_letter]))
    return metrics, True, details
