"""Steering by SAE features: what an intervention is, and the residual edit it makes at the SAE's hook.

With z = SAE code of the residual x and z' the code after the interventions, the hook replaces x by

    x' = x + (decode(z') - decode(z)) = x + sum over changed features f of (z'_f - z_f) W_dec[f]

(the decoder is linear; b_pre cancels). The SAE's reconstruction error x - decode(z) stays in the
residual, so an empty intervention, or one that leaves every code unchanged, is exactly the identity.
Modes, applied on every position (prompt and generated):
    clamp v   z'_f = v           (Anthropic's clamping; v often a multiple of the feature's max activation)
    add v     z'_f = z_f + v     i.e. x + v W_dec[f]: a multiple of the unit-norm decoder direction (Neuronpedia)
    scale s   z'_f = s z_f
Interventions on one feature apply in the order given (clamp 5 then add 3 sets it to 8).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal
from urllib.parse import quote, urlencode

import torch

from .errors import LiveError, NotFound

if TYPE_CHECKING:
    from ..config import GenerationConfig
    from ..sae.base import DictionarySAE

Mode = Literal["clamp", "add", "scale"]
MODES: tuple[Mode, ...] = ("clamp", "add", "scale")
SPEC = re.compile(r"^\s*(\d+)\s*:\s*(clamp|add|scale)\s*:\s*(-?\d+(?:\.\d*)?(?:e-?\d+)?)\s*$")


@dataclass(frozen=True)
class Intervention:
    feature: int
    mode: Mode
    value: float

    @classmethod
    def parse(cls, spec: str) -> Intervention:
        """FEATURE:MODE:VALUE, e.g. 5475:clamp:40 (the CLI's --feature and the permalink's `f` parameter)."""
        m = SPEC.match(spec)
        if not m:
            raise LiveError(f"intervention {spec!r} is not FEATURE:MODE:VALUE with MODE clamp, add or scale (e.g. 5475:clamp:40)")
        return cls(int(m.group(1)), m.group(2), float(m.group(3)))  # type: ignore[arg-type]  # the pattern admits the modes only

    def spec(self) -> str:
        return f"{self.feature}:{self.mode}:{self.value:g}"


def check_interventions(interventions: list[Intervention], n_latents: int, limit: int) -> None:
    """Reject what the hook cannot apply: too many, an index out of range, a non-finite value."""
    if len(interventions) > limit:
        raise LiveError(f"at most {limit} interventions per request (got {len(interventions)})")
    for iv in interventions:
        if iv.mode not in MODES:
            raise LiveError(f"unknown mode {iv.mode!r}: use clamp, add or scale")
        if not 0 <= iv.feature < n_latents:
            raise NotFound(f"feature {iv.feature} does not exist: this SAE has features 0..{n_latents - 1}")
        if not abs(iv.value) < 1e6:
            raise LiveError(f"value {iv.value} of feature {iv.feature} is out of range (|value| < 1e6)")


class SteeringHook:
    """fn(residual) -> steered residual, for `LanguageModel.replace_residual` at the SAE's hook."""

    def __init__(self, sae: DictionarySAE, interventions: list[Intervention]) -> None:
        self.sae = sae
        self.interventions = list(interventions)
        if self.interventions:
            unique = list(dict.fromkeys(iv.feature for iv in self.interventions))  # each changed feature once, in order
            self.slot = [unique.index(iv.feature) for iv in self.interventions]
            self.features = torch.tensor(unique)
            self.values = torch.tensor([iv.value for iv in self.interventions], dtype=torch.float32)
            self.modes = [iv.mode for iv in self.interventions]
            self.directions = sae.W_dec.detach()[self.features].float()  # [u, d]

    @torch.no_grad()
    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        if not self.interventions:
            return h
        x = h.float()
        z = self.sae.encode(x)[..., self.features.to(x.device)]  # [..., u]: each changed feature's current code
        values = self.values.to(x.device)
        code = list(z.unbind(-1))
        for i, (mode, j) in enumerate(zip(self.modes, self.slot)):  # in the order given, so one feature's changes compose
            code[j] = values[i].expand_as(code[j]) if mode == "clamp" else code[j] + values[i] if mode == "add" else code[j] * values[i]
        target = torch.stack(code, dim=-1)
        return (x + (target - z) @ self.directions.to(x.device)).to(h.dtype)


def steer_permalink(sae: str, prompt: str, interventions: list[Intervention], settings: GenerationConfig) -> str:
    """The steering page's URL for this request: prompt, interventions, seed and settings in the query, so
    whoever opens it gets the same result (for a given seed, model dtype and machine kind)."""
    query: list[tuple[str, object]] = [("prompt", prompt)]
    for iv in interventions:
        query += [("feature", iv.feature), ("mode", iv.mode), ("value", f"{iv.value:g}")]
    s = settings
    query += [("max_new_tokens", s.max_new_tokens), ("temperature", f"{s.temperature:g}"), ("top_p", f"{s.top_p:g}"), ("seed", s.seed)]
    return f"/saes/{quote(sae, safe='')}/steer?{urlencode(query)}"
