"""Steering by SAE features: what an intervention is, and the residual edit it makes at the SAE's hook.

With z = SAE code of the residual x and z' the code after the interventions, the hook replaces x by

    x' = x + (decode(z') - decode(z)) = x + sum over changed features f of (z'_f - z_f) W_dec[f]

(the decoder is linear; b_pre cancels). The SAE's reconstruction error x - decode(z) stays in the
residual, so an empty intervention, or one that leaves every code unchanged, is exactly the identity.
A transcoder (reads layer L's MLP input x, predicts its output y) is steered the same way on y: z is the
code of x and y' = y + decode(z') - decode(z), its error y - transcode(x) kept; cap and ortho act on y.
Modes on the code (the SAE's view):
    clamp v   z'_f = v           (Anthropic's clamping; v often a multiple of the feature's max activation)
    add v     z'_f = z_f + v     i.e. x + v W_dec[f]: a multiple of the unit-norm decoder direction (Neuronpedia)
    scale s   z'_f = s z_f
Modes on the residual itself, along u = W_dec[f] / |W_dec[f]| (the code plays no part):
    cap c     the projection p = x.u is limited to c: x' = x - max(p - c, 0) u; positions with p <= c
              are left exactly as they are (a ceiling on how much of the direction the residual carries)
    ortho s   orthogonal decomposition as Neuronpedia's ORTHOGONAL_DECOMP defines it: x = (I - P)x + Px
              with P = u u^T, and x' = (I - P)x + s Px, i.e. the component along u scaled by s and the
              orthogonal rest untouched
The code modes apply first, in the order given (clamp 5 then add 3 sets a feature to 8), all read from
the incoming residual's code; then the residual modes, in the order given, on the result.

Conditions (an intervention applies only at some positions; elsewhere the residual is left bit for bit):
    @gen          only on generated positions (the prompt's positions are untouched)
    @prompt       only on the prompt's positions
    @F>T          only where feature F of the same SAE is above T on the incoming (unsteered-here) residual
    @SAE:F>T      only where feature F of SAE `SAE` (at an earlier hook, or the same) is above T
A feature condition reads the residual as it reaches that hook in this run (earlier steering included).
Spec: FEATURE:MODE:VALUE[@CONDITION], e.g. 5475:clamp:40@gen or 5475:add:8@other-sae:120>2.5; a spec
without @ is the old unconditional one.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal
from urllib.parse import quote, urlencode

import torch

from .errors import LiveError, NotFound

if TYPE_CHECKING:
    from ..config import GenerationConfig
    from ..sae.base import DictionarySAE

Mode = Literal["clamp", "add", "scale", "cap", "ortho"]
MODES: tuple[Mode, ...] = ("clamp", "add", "scale", "cap", "ortho")
CODE_MODES = ("clamp", "add", "scale")
RESIDUAL_MODES = ("cap", "ortho")
_NUM = r"-?\d+(?:\.\d*)?(?:e[-+]?\d+)?"
# DOTALL: whatever the API's patterns admit (an SAE name may hold any character but ':' and NUL) parses here, so a
# schema-valid request is refused, if at all, for a reason (an unknown SAE: 404), never as unparseable.
SPEC = re.compile(rf"^\s*(\d+)\s*:\s*(clamp|add|scale|cap|ortho)\s*:\s*({_NUM})\s*(?:@\s*(.+?))?\s*$", re.DOTALL)
CONDITION = re.compile(rf"^(?:(gen|prompt)|(?:(.+):)?(\d+)\s*>\s*({_NUM}))$", re.DOTALL)

ConditionKind = Literal["feature", "generated", "prompt"]


def number(x: float) -> str:
    """x as short as it reads back exactly: %g where that loses nothing (10, 0.5), else repr (0.1234567), so a
    spec (and the sweep permalink's key made of it) names exactly the value that ran."""
    short = f"{x:g}"
    return short if float(short) == x else repr(float(x))


@dataclass(frozen=True)
class Condition:
    """Where an intervention applies: `generated` positions, `prompt` positions, or where `feature` (of
    `sae`, None: the intervention's own SAE) is above `threshold`."""

    kind: ConditionKind
    feature: int | None = None
    threshold: float = 0.0
    sae: str | None = None

    @classmethod
    def parse(cls, text: str) -> Condition:
        m = CONDITION.match(text.strip())
        if not m:
            raise LiveError(f"condition {text!r} is not gen, prompt, FEATURE>THRESHOLD or SAE:FEATURE>THRESHOLD")
        if m.group(1):
            return cls("generated" if m.group(1) == "gen" else "prompt")
        # a threshold past the float range ("1e999") holds as the largest finite one: activations are finite, so where
        # it holds is the same, and the condition's spec reads back and stays valid JSON (inf is neither)
        threshold = max(-sys.float_info.max, min(sys.float_info.max, float(m.group(4))))
        return cls("feature", int(m.group(3)), threshold, m.group(2) or None)

    def spec(self) -> str:
        if self.kind == "generated":
            return "gen"
        if self.kind == "prompt":
            return "prompt"
        return f"{self.sae + ':' if self.sae else ''}{self.feature}>{number(self.threshold)}"


@dataclass(frozen=True)
class Intervention:
    feature: int
    mode: Mode
    value: float
    condition: Condition | None = None

    @classmethod
    def parse(cls, spec: str) -> Intervention:
        """FEATURE:MODE:VALUE[@CONDITION], e.g. 5475:clamp:40 or 5475:add:8@gen (the CLI's --feature and the permalink's `f`)."""
        m = SPEC.match(spec)
        if not m:
            raise LiveError(
                f"intervention {spec!r} is not FEATURE:MODE:VALUE[@CONDITION], MODE clamp, add, scale, cap or ortho (e.g. 5475:clamp:40)"
            )
        condition = Condition.parse(m.group(4)) if m.group(4) else None
        return cls(int(m.group(1)), m.group(2), float(m.group(3)), condition)  # type: ignore[arg-type]  # the pattern admits the modes only

    def spec(self) -> str:
        return f"{self.feature}:{self.mode}:{number(self.value)}" + (f"@{self.condition.spec()}" if self.condition else "")

    def with_value(self, value: float) -> Intervention:
        return Intervention(self.feature, self.mode, value, self.condition)


def check_interventions(interventions: list[Intervention], n_latents: int, limit: int, saes: dict[str, int] | None = None) -> None:
    """Reject what the hook cannot apply: too many, an index out of range, a non-finite value, a condition
    on an unknown SAE or feature. `saes`: the other SAEs a condition may name, with their feature counts."""
    if len(interventions) > limit:
        raise LiveError(f"at most {limit} interventions per request (got {len(interventions)})")
    for iv in interventions:
        if iv.mode not in MODES:
            raise LiveError(f"unknown mode {iv.mode!r}: use clamp, add, scale, cap or ortho")
        if not 0 <= iv.feature < n_latents:
            raise NotFound(f"feature {iv.feature} does not exist: this SAE has features 0..{n_latents - 1}")
        if not abs(iv.value) < 1e6:
            raise LiveError(f"value {iv.value} of feature {iv.feature} is out of range (|value| < 1e6)")
        c = iv.condition
        if c is not None and c.kind == "feature":
            width = n_latents if c.sae is None else (saes or {}).get(c.sae)
            if width is None:
                raise NotFound(f"the condition's SAE {c.sae!r} is not available here")
            if c.feature is None or not 0 <= c.feature < width:
                raise NotFound(f"the condition's feature {c.feature} does not exist: {c.sae or 'this SAE'} has features 0..{width - 1}")
            if not abs(c.threshold) < 1e6:
                raise LiveError(f"threshold {c.threshold} is out of range (|threshold| < 1e6)")


class ConditionReader:
    """Records a condition SAE's feature activations at an earlier hook for the forward under way, so a
    later hook's conditions can read them. Watch `hook` with `record` (LanguageModel.watch); `where`: the hook
    the SAE reads (an int: the residual after that layer)."""

    def __init__(self, sae: DictionarySAE, where: int | str, features: list[int]) -> None:
        self.sae = sae
        self.hook = f"blocks.{where}.hook_resid_post" if isinstance(where, int) else where
        self.features = torch.tensor(sorted(set(features)))
        self.acts: dict[int, torch.Tensor] = {}  # feature -> [..., seq] activations of the current forward

    @torch.no_grad()
    def record(self, h: torch.Tensor) -> torch.Tensor:
        z = self.sae.encode(h.float())[..., self.features.to(h.device)]
        self.acts = {int(f): z[..., i] for i, f in enumerate(self.features.tolist())}
        return h


class SteeringHook:
    """fn(residual) -> steered residual, for `LanguageModel.replace_residual` at the SAE's hook; or
    fn(code input, target) -> steered target, for `LanguageModel.edit` at a transcoder's site: the code is read
    from the MLP's input x and the MLP's output y is edited, y' = y + decode(z') - decode(z), so y's part the
    transcoder misses stays as the residual SAE's error does; cap and ortho act on y along W_dec[f].

    prompt_len: the (padded) prompt's length, for the gen/prompt conditions: the hook counts the positions
    it has seen (a KV-cached generation feeds the prompt once, then one position per step); a fresh hook
    per generation. readers: the ConditionReaders of conditions on other SAEs, by SAE name; a condition on
    another SAE at this same hook passes that SAE as `same_hook` (it reads this hook's incoming residual).
    row_values: [batch, n_interventions] values per batch row (a sweep's strengths), else each
    intervention's own value on every row."""

    def __init__(
        self,
        sae: DictionarySAE,
        interventions: list[Intervention],
        prompt_len: int | None = None,
        readers: dict[str, ConditionReader] | None = None,
        same_hook: dict[str, DictionarySAE] | None = None,
        row_values: torch.Tensor | None = None,
    ) -> None:
        self.sae = sae
        self.interventions = list(interventions)
        self.prompt_len = prompt_len
        self.readers = readers or {}
        self.same_hook = same_hook or {}
        self.seen = 0  # positions fed so far in this generation
        vals = [iv.value for iv in self.interventions]
        self.values = row_values.float() if row_values is not None else torch.tensor([vals], dtype=torch.float32)  # [rows or 1, n]
        if self.interventions:
            code_ivs = [iv for iv in self.interventions if iv.mode in CODE_MODES]
            unique = list(dict.fromkeys(iv.feature for iv in code_ivs))  # each changed feature once, in order
            self.features = torch.tensor(unique, dtype=torch.long)
            self.slot = [unique.index(iv.feature) if iv.mode in CODE_MODES else -1 for iv in self.interventions]
            self.modes = [iv.mode for iv in self.interventions]
            self.directions = sae.W_dec.detach()[self.features].float()  # [u, d]
            all_features = torch.tensor([iv.feature for iv in self.interventions], dtype=torch.long)
            w = sae.W_dec.detach()[all_features].float()
            self.units = w / w.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # [n, d] unit directions for cap and ortho
        self.always = all(iv.condition is None for iv in self.interventions)

    def _value(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Intervention i's value broadcast against x[..., 0]: [rows, 1] for [rows, seq, d], a scalar otherwise."""
        v = self.values[:, i].to(x.device)
        if x.dim() == 3:
            return v[:, None]
        return v[0]

    def _mask(self, iv: Intervention, x: torch.Tensor, z_own: torch.Tensor | None) -> torch.Tensor | None:
        """Where iv applies ([..., seq] bool), None: everywhere."""
        c = iv.condition
        if c is None:
            return None
        seq = x.shape[-2]
        if c.kind in ("generated", "prompt"):
            if self.prompt_len is None:
                raise LiveError("a gen/prompt condition needs the prompt's length")
            pos = torch.arange(self.seen, self.seen + seq, device=x.device)
            mask = pos >= self.prompt_len if c.kind == "generated" else pos < self.prompt_len
            return mask.expand(x.shape[:-1])
        assert c.feature is not None
        if c.sae is None:
            acts = self.sae.encode(x)[..., c.feature] if z_own is None else z_own[..., c.feature]
        elif c.sae in self.same_hook:
            acts = self.same_hook[c.sae].encode(x)[..., c.feature]
        else:
            acts = self.readers[c.sae].acts[c.feature]
        return acts > c.threshold

    @torch.no_grad()
    def __call__(self, h: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        try:
            return self._steer(h, h if target is None else target)
        finally:
            self.seen += h.shape[-2]

    def _steer(self, h_in: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """`h_in`: what the code reads; `h`: what is edited (the same tensor for an SAE)."""
        if not self.interventions:
            return h
        x = h_in.float()
        own = [iv.condition for iv in self.interventions if iv.condition is not None]
        need_code = len(self.features) > 0 or any(c.kind == "feature" and c.sae is None for c in own)
        z_full = self.sae.encode(x) if need_code else None
        masks = [self._mask(iv, x, z_full) for iv in self.interventions]
        if not self.always and not any(m is None or bool(m.any()) for m in masks):
            return h  # nothing applies at these positions: exactly the residual that came in
        out = h.float()  # x itself for an SAE
        if len(self.features):
            assert z_full is not None
            z = z_full[..., self.features.to(x.device)]  # [..., u]: each changed feature's current code
            code = list(z.unbind(-1))
            for i, (mode, j) in enumerate(zip(self.modes, self.slot)):  # in the order given, so one feature's changes compose
                if j < 0:
                    continue
                v = self._value(i, x)
                new = v.expand_as(code[j]) if mode == "clamp" else code[j] + v if mode == "add" else code[j] * v
                m = masks[i]
                code[j] = new if m is None else torch.where(m, new, code[j])
            target = torch.stack(code, dim=-1)
            out = out + (target - z) @ self.directions.to(x.device)
        for i, mode in enumerate(self.modes):
            if mode in CODE_MODES:
                continue
            u = self.units[i].to(x.device)
            p = out @ u  # [..., seq] the component along u
            v = self._value(i, x)
            change = -(p - v).clamp_min(0) if mode == "cap" else (v - 1) * p
            stepped = out + change[..., None] * u
            if mode == "cap":
                stepped = torch.where((p > v)[..., None], stepped, out)  # below the cap: the residual exactly as it was
            m = masks[i]
            out = stepped if m is None else torch.where(m[..., None], stepped, out)
        if not self.always:  # positions no intervention touches keep the incoming residual bit for bit
            touched = torch.zeros(x.shape[:-1], dtype=torch.bool, device=x.device)
            for m in masks:
                touched = touched | m if m is not None else torch.ones_like(touched)
            return torch.where(touched[..., None], out.to(h.dtype), h)
        return out.to(h.dtype)


def steer_permalink(sae: str, prompt: str, interventions: list[Intervention], settings: GenerationConfig) -> str:
    """The steering page's URL for this request: prompt, interventions, seed and settings in the query, so
    whoever opens it gets the same result (for a given seed, model dtype and machine kind)."""
    query: list[tuple[str, object]] = [("prompt", prompt)]
    conditional = any(iv.condition is not None for iv in interventions)
    for iv in interventions:
        query += [("feature", iv.feature), ("mode", iv.mode), ("value", f"{iv.value:g}")]
        if conditional:  # one `when` per intervention, aligned ("" = always), only when some are conditional: old links unchanged
            query.append(("when", iv.condition.spec() if iv.condition else ""))
    s = settings
    query += [("max_new_tokens", s.max_new_tokens), ("temperature", f"{s.temperature:g}"), ("top_p", f"{s.top_p:g}"), ("seed", s.seed)]
    return f"/saes/{quote(sae, safe='')}/steer?{urlencode(query)}"
