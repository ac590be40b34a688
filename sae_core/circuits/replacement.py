"""The local replacement model of one prompt (Ameisen et al. 2025, "Circuit Tracing", section 2).

Every MLP is replaced by its transcoder; the attention patterns and the RMSNorm denominators are frozen at the values
of the real forward pass; an error node per layer and position holds what the transcoder misses (the real MLP output
minus the transcoder's). With the sources (token embeddings, active features' activations, error vectors) held at their
real values, the replacement reproduces the model's logits; with the patterns and denominators frozen, everything
downstream of a source is linear in it, so an edge is a source's activation times a backward derivative.

The frozen forward takes "writes" into the residual stream: the embedding [B, T, d] and, per layer, the constant part
of the MLP's replacement output (decoded features + output bias + error) [B, T, d]; a skip transcoder's W_skip x
stays a linear path inside the frozen forward (its x is the frozen-normalised MLP input).

The frozen model is linear in its writes, so a target's derivatives do not need a forward pass: `transposed_pass` runs
the transpose of each frozen layer from the targets down to the embedding (the skip term's W_skip^T, the frozen
RMSNorm scales, the frozen attention's P^T through W_O^T and W_V^T), about a third of an autograd forward + backward.

Llama layout only (the bundled model's): q/k/v/o projections with rotary embeddings and grouped key/value heads, RMSNorm
before attention, before the MLP and before the unembedding, no attention biases.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import SaescopeError
from ..sae.transcoder import TranscoderSAE


@dataclass
class LayerState:
    """One decoder layer's frozen values for the prompt (real forward pass)."""

    attn_denom: torch.Tensor  # [T, 1]: 1 / RMS of the residual entering attention (the norm's multiplier, weight apart)
    attn_probs: torch.Tensor  # [H, T, T]: attention probabilities
    mlp_denom: torch.Tensor  # [T, 1]: 1 / RMS of the residual entering the MLP
    mlp_in: torch.Tensor  # [T, d]: the MLP's normalised input (what the transcoder reads)
    mlp_out: torch.Tensor  # [T, d]: the real MLP's output
    values: torch.Tensor  # [T, k]: the transcoder's active values (after ReLU; zeros are inactive)
    indices: torch.Tensor  # [T, k]: their latent indices
    decoded: torch.Tensor  # [T, d]: sum of active values times decoder rows (no bias, no skip)
    error: torch.Tensor  # [T, d]: mlp_out minus the transcoder's output


def _llama_parts(model: Any) -> tuple[Any, Any, Any, Any]:  # transformers' modules, read by attribute
    base = getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    if base is None or layers is None or not hasattr(base, "rotary_emb") or not hasattr(base, "norm"):
        raise SaescopeError(f"attribution graphs need a Llama-layout model (model.layers, rotary_emb, norm); got {type(model).__name__}")
    attn = layers[0].self_attn
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        if not hasattr(attn, name):
            raise SaescopeError(f"attribution graphs need Llama attention (q/k/v/o projections); {type(attn).__name__} has no {name}")
        if getattr(getattr(attn, name), "bias", None) is not None:
            raise SaescopeError("attribution graphs do not support attention biases yet")
    return base, layers, base.norm, model.get_output_embeddings()


def _rms_multiplier(norm: Any, x: torch.Tensor) -> torch.Tensor:
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
    return torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps).to(x.dtype)


class ReplacementModel:
    """The local replacement model of `model` for one prompt `input_ids` [T], with `transcoders` {layer: transcoder}
    for every layer. Built by one real forward pass (no gradients), which records what is frozen."""

    def __init__(self, model: Any, transcoders: dict[int, TranscoderSAE], input_ids: torch.Tensor) -> None:
        self.model: Any = model
        self.base, self.layers, self.final_norm, self.unembed = _llama_parts(model)
        self.n_layers = len(self.layers)
        missing = sorted(set(range(self.n_layers)) - set(transcoders))
        if missing:
            raise SaescopeError(f"the replacement model needs a transcoder for every layer; missing layers {missing}")
        self.transcoders = transcoders
        if input_ids.dim() != 1 or len(input_ids) == 0:
            raise SaescopeError("a prompt is a non-empty 1-D sequence of token ids")
        self.input_ids = input_ids
        attn = self.layers[0].self_attn
        cfg = model.config
        self.n_heads = int(cfg.num_attention_heads)
        self.n_kv = int(getattr(cfg, "num_key_value_heads", None) or self.n_heads)
        self.head_dim = int(getattr(attn, "head_dim", cfg.hidden_size // self.n_heads))
        self.scaling = float(getattr(attn, "scaling", self.head_dim**-0.5))
        self.states: list[LayerState] = []
        with torch.no_grad():
            self._real_forward()

    # ------------------------------------------------------------------ the real pass

    @property
    def n_pos(self) -> int:
        return len(self.input_ids)

    def _rotary(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.arange(self.n_pos, device=x.device)[None]
        cos, sin = self.base.rotary_emb(x, pos)
        return cos, sin

    def _real_forward(self) -> None:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        ids = self.input_ids[None]
        h = self.base.embed_tokens(ids)[0]  # [T, d]
        self.embed = h.clone()
        T = self.n_pos
        cos, sin = self._rotary(h[None])
        causal = torch.ones(T, T, dtype=torch.bool, device=h.device).tril()
        for L, layer in enumerate(self.layers):
            a = layer.self_attn
            r1 = _rms_multiplier(layer.input_layernorm, h)
            x = layer.input_layernorm.weight * (h * r1)
            q = a.q_proj(x).view(T, self.n_heads, self.head_dim).transpose(0, 1)[None]
            k = a.k_proj(x).view(T, self.n_kv, self.head_dim).transpose(0, 1)[None]
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            k = k[0].repeat_interleave(self.n_heads // self.n_kv, dim=0)
            scores = (q[0] @ k.transpose(-1, -2)) * self.scaling
            probs = torch.softmax(scores.masked_fill(~causal, float("-inf")).float(), dim=-1).to(h.dtype)
            h = h + self._attend(layer, x[None], probs)[0]
            r2 = _rms_multiplier(layer.post_attention_layernorm, h)
            mlp_in = layer.post_attention_layernorm.weight * (h * r2)
            mlp_out = layer.mlp(mlp_in)
            tc = self.transcoders[L]
            vals, idx = tc.encode_sparse(mlp_in.to(tc.W_enc.dtype))
            vals, idx = vals.to(h.dtype), idx
            decoded = (vals[..., None] * tc.W_dec[idx].to(h.dtype)).sum(-2)
            predicted = tc.transcode(mlp_in.to(tc.W_enc.dtype)).to(h.dtype)
            self.states.append(LayerState(r1, probs, r2, mlp_in, mlp_out, vals, idx, decoded, mlp_out - predicted))
            h = h + mlp_out
        self.final_denom = _rms_multiplier(self.final_norm, h)
        self.logits = self.unembed(self.final_norm.weight * (h * self.final_denom))  # [T, V]

    def _attend(self, layer: Any, x: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """Attention output for normalised inputs x [B, T, d] under the frozen probabilities [H, T, T]."""
        a = layer.self_attn
        B, T, _ = x.shape
        v = a.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # [B, Hkv, T, dh]
        v = v.repeat_interleave(self.n_heads // self.n_kv, dim=1)
        out = (probs[None] @ v).transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
        return a.o_proj(out)

    # ------------------------------------------------------------------ the frozen linear model

    def constant_writes(self) -> list[torch.Tensor]:
        """Each layer's MLP write at the sources' real values: decoded features + output bias + error [T, d]."""
        return [s.decoded + self.transcoders[L].b_pre.to(s.decoded.dtype) + s.error for L, s in enumerate(self.states)]

    def frozen_forward(
        self, embed: torch.Tensor, writes: list[torch.Tensor], stop_layer: int | None = None
    ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """Run the frozen model on writes [B, P, d] (embedding and one per layer) over the first P <= T positions (the
        model is causal: they do not read later ones). Returns the MLP inputs [B, P, d] of layers 0..stop_layer (all
        layers if None) and, when stop_layer is None, the final normalised residual."""
        P = embed.shape[1]
        h = embed
        last = self.n_layers - 1 if stop_layer is None else stop_layer
        mlp_ins = []
        for L in range(last + 1):
            layer, s = self.layers[L], self.states[L]
            x = layer.input_layernorm.weight * (h * s.attn_denom[:P])
            h = h + self._attend(layer, x, s.attn_probs[:, :P, :P])
            mlp_in = layer.post_attention_layernorm.weight * (h * s.mlp_denom[:P])
            mlp_ins.append(mlp_in)
            if L == last and stop_layer is not None:
                return mlp_ins, None
            out = writes[L]
            skip = self.transcoders[L].skip(mlp_in)
            h = h + (out if skip is None else out + skip.to(out.dtype))
        return mlp_ins, self.final_norm.weight * (h * self.final_denom[:P])

    def transposed_pass(
        self,
        layers: list[int | None],
        positions: list[int],
        directions: torch.Tensor,
        on_write: Callable[[int, torch.Tensor], None],
    ) -> torch.Tensor:
        """Vector-Jacobian products of a batch of targets: target b reads layer layers[b]'s MLP input (None: the final
        normalised residual) at positions[b] along directions[b] [B, d]. Calls on_write(L, g) with the derivative of
        every target with respect to layer L's write, position-major [P, B, d] (P = max position + 1: later positions
        cannot matter; position-major makes each position's batch one matmul), deepest layer first, for the layers some
        target reads from above; g is only valid during the call. Returns the derivative with respect to the embedding
        [P, B, d]. The derivative with respect to layer L's write is the residual's after layer L."""
        B, P = len(layers), max(positions) + 1
        dtype = self.embed.dtype
        pos = torch.tensor(positions, device=directions.device)
        dirs = directions.to(dtype)
        g = torch.zeros(P, B, self.embed.shape[-1], dtype=dtype, device=directions.device)
        logit_rows = [b for b, L in enumerate(layers) if L is None]
        if logit_rows:
            r = torch.tensor(logit_rows, device=g.device)
            g[pos[r], r] = dirs[r] * self.final_norm.weight.to(dtype) * self.final_denom[pos[r]]
            top = self.n_layers - 1
        else:
            top = max(L for L in layers if L is not None)
        live = bool(logit_rows)  # whether any target has been seeded yet (above that, g is zero)
        for L in range(top, -1, -1):
            layer, s = self.layers[L], self.states[L]
            post_w = layer.post_attention_layernorm.weight.to(dtype)
            if live:
                on_write(L, g)
                # the skip term reads the MLP input: its transpose, through the frozen norm
                W_skip = self._skip_weight(L)
                if W_skip is not None:
                    g = g + (g @ W_skip.to(dtype)).mul_(s.mlp_denom[:P, None]).mul_(post_w)
            # the targets that read this layer's MLP input enter here
            seeded = [b for b, tl in enumerate(layers) if tl == L]
            if seeded:
                r = torch.tensor(seeded, device=g.device)
                g[pos[r], r] += dirs[r] * post_w * s.mlp_denom[pos[r]]
                live = True
            # through the attention block: h + attend(norm(h))
            g_x = self._attend_transposed(L, g, s.attn_probs[:, :P, :P])
            g = g + g_x.mul_(s.attn_denom[:P, None]).mul_(layer.input_layernorm.weight.to(dtype))
        return g

    def _skip_weight(self, L: int) -> torch.Tensor | None:
        tc = self.transcoders[L]
        W = getattr(tc, "W_skip", None)
        if W is None and tc.skip(self.embed[:1]) is not None:
            raise SaescopeError(f"layer {L}'s transcoder has a skip term but no W_skip matrix to transpose")
        return None if W is None else W.detach()

    def _attend_transposed(self, L: int, g: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """The transpose of `_attend` (linear in x under frozen probabilities [H, P, P]) applied to g [P, B, d]: W_O^T,
        each head's P^T (one matmul per head over the whole batch), the heads that share a key/value head summed (head
        h reads key/value head h // group, as repeat_interleave lays them out), then W_V^T."""
        a = self.layers[L].self_attn
        P, B, _ = g.shape
        H, kv, dh = self.n_heads, self.n_kv, self.head_dim
        go = (g @ a.o_proj.weight.to(g.dtype)).view(P, B, H, dh).permute(2, 0, 1, 3).reshape(H, P, B * dh)
        gv = torch.bmm(probs.transpose(-1, -2).contiguous(), go)  # [H, P, B * dh]
        gv = gv.view(kv, H // kv, P * B * dh).sum(1).view(kv, P, B, dh).permute(1, 2, 0, 3).reshape(P, B, kv * dh)
        return gv @ a.v_proj.weight.to(g.dtype)

    def replacement_logits(self) -> torch.Tensor:
        """The replacement model's logits [T, V] at the sources' real values (equal to the model's, up to rounding)."""
        with torch.no_grad():
            _, final = self.frozen_forward(self.embed[None], [w[None] for w in self.constant_writes()])
            assert final is not None
            return self.unembed(final)[0]
