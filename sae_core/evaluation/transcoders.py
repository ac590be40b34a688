"""Evaluate the transcoders of a `saescope train --transcoders` run on held-out windows (the corpus windows after
the trained ones, as `saescope eval` takes them):

  fvu[L]        layer L's transcoder's fraction of variance unexplained of its MLP's output, given the MLP's
                input in the clean forward pass
  ce_replaced   the next-token cross-entropy with every trained layer's MLP replaced by its transcoder at once
                (forward hooks on each MLP: the errors of earlier transcoders reach later ones, as in a replacement model)
  ce_clean      the model's own; ce_zeroed: with those MLPs' outputs zeroed; ce_score = (zeroed - replaced) / (zeroed - clean)
  kl            KL(clean || replaced) per predicted token; kl_zeroed: KL(clean || those MLPs zeroed)
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

from .. import corpus as corpus_mod
from ..errors import SaescopeError
from ..interchange import LoadedSAE, load_sae
from ..model import LanguageModel, load_model, parse_hook_point
from ..sae.transcoder import TranscoderSAE


def load_transcoders(out: str | Path) -> dict[int, LoadedSAE]:
    """layer -> the loaded transcoder, for a `train_transcoders` output folder (its transcoders.json)."""
    from ..train_transcoders import layer_folders

    loaded = {layer: load_sae(folder) for layer, folder in layer_folders(Path(out)).items()}
    for layer, item in loaded.items():
        point = parse_hook_point(item.provenance.require(out)[1])
        if not isinstance(item.sae, TranscoderSAE) or point != (layer, "mlp_in"):
            raise SaescopeError(f"{out}: layer {layer}'s folder does not hold a transcoder reading blocks.{layer}.hook_mlp_in")
    return loaded


def _ce(logits: torch.Tensor, targets: torch.Tensor, skip: int) -> tuple[torch.Tensor, torch.Tensor]:
    logp = logits[:, skip:-1].float().log_softmax(-1)
    return logp, -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def _in_fp32(tc: TranscoderSAE) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: tc.transcode(x.float())  # replace_mlps casts the result to the model's dtype


@torch.inference_mode()
def evaluate_transcoders(
    out: str | Path,
    tokens: int = 16384,
    batch_size: int = 8,
    device: str = "auto",
    lm: LanguageModel | None = None,
    window_stride: int = 16,
    progress: bool = True,
) -> dict:
    """The report described in the module docstring, over about `tokens` held-out tokens."""
    loaded = load_transcoders(out)
    first = next(iter(loaded.values()))
    prov = first.provenance
    model_name, _ = prov.require(out)
    lm = lm or load_model(model_name, device)
    layers = sorted(loaded)
    saes: dict[int, TranscoderSAE] = {}
    for layer, item in loaded.items():
        assert isinstance(item.sae, TranscoderSAE)  # load_transcoders checked it
        saes[layer] = item.sae.to(lm.device).eval()
    context, skip = prov.context_size, prov.skip_positions
    corpus = corpus_mod.open_corpus(prov.corpus)
    n_windows = -(-tokens // context)
    windows = corpus_mod.spread_windows(corpus, lm.tokenizer, context, prov.seed, prov.trained_windows, n_windows, window_stride)
    d = lm.d_model
    sq_err = {layer: 0.0 for layer in layers}
    sum_y = {layer: torch.zeros(d, dtype=torch.float64) for layer in layers}
    sum_sq = {layer: 0.0 for layer in layers}
    n = n_pred = 0
    ce = {"clean": 0.0, "replaced": 0.0, "zeroed": 0.0}
    kl = kl_zeroed = 0.0
    replaced: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {layer: _in_fp32(sae) for layer, sae in saes.items()}
    zeroed: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {layer: torch.zeros_like for layer in layers}
    captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> (MLP input, output) of the clean forward

    def keep(layer: int) -> Callable[[torch.Tensor], torch.Tensor]:
        def hook(x: torch.Tensor) -> torch.Tensor:
            y = lm.mlp(layer).forward(x)
            captured[layer] = (x, y)
            return y

        return hook

    done = 0
    bar = tqdm(total=n_windows * context, unit="tok", unit_scale=True, desc="evaluating transcoders", disable=not progress)
    while done < n_windows:
        parts = list(itertools.islice(windows, min(batch_size, n_windows - done)))
        if not parts:
            break
        ids = torch.from_numpy(corpus_mod.Windows.cat(parts).tokens).long().to(lm.device)
        targets = ids[:, skip + 1 :]
        with lm.replace_mlps({layer: keep(layer) for layer in layers}):
            clean_logp, clean_ce = _ce(lm.model(input_ids=ids, use_cache=False).logits, targets, skip)
        for layer in layers:
            x, y = (t[:, skip:].float().reshape(-1, d) for t in captured[layer])
            y_hat = saes[layer].transcode(x)
            sq_err[layer] += float((y - y_hat).pow(2).sum())
            sum_y[layer] += y.double().sum(0).cpu()
            sum_sq[layer] += float(y.double().pow(2).sum())
        with lm.replace_mlps(replaced):
            rep_logp, rep_ce = _ce(lm.model(input_ids=ids, use_cache=False).logits, targets, skip)
        with lm.replace_mlps(zeroed):
            zero_logp, zero_ce = _ce(lm.model(input_ids=ids, use_cache=False).logits, targets, skip)
        ce["clean"] += float(clean_ce.sum())
        ce["replaced"] += float(rep_ce.sum())
        ce["zeroed"] += float(zero_ce.sum())
        kl += float((clean_logp.exp() * (clean_logp - rep_logp)).sum())
        kl_zeroed += float((clean_logp.exp() * (clean_logp - zero_logp)).sum())
        n += targets.shape[0] * (context - skip)
        n_pred += targets.numel()
        done += len(parts)
        bar.update(len(parts) * context)
    bar.close()
    if n == 0:
        raise SaescopeError("the corpus has no held-out windows left after the trained ones; evaluate on a longer corpus")
    fvu = {layer: sq_err[layer] / max(sum_sq[layer] - float(sum_y[layer].pow(2).sum()) / n, 1e-12) for layer in layers}
    ce_mean = {k: v / n_pred for k, v in ce.items()}
    return {
        "tokens": n,
        "layers": layers,
        "fvu": fvu,
        "fvu_mean": sum(fvu.values()) / len(fvu),
        "ce_clean": ce_mean["clean"],
        "ce_replaced": ce_mean["replaced"],
        "ce_zeroed": ce_mean["zeroed"],
        "delta_ce": ce_mean["replaced"] - ce_mean["clean"],
        "ce_score": (ce_mean["zeroed"] - ce_mean["replaced"]) / max(ce_mean["zeroed"] - ce_mean["clean"], 1e-12),
        "kl": kl / n_pred,
        "kl_zeroed": kl_zeroed / n_pred,
    }
