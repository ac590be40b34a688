"""Pydantic shapes of everything the app serves: the REST API's JSON and what the templates render."""

from __future__ import annotations

from enum import Enum

from pydantic import BaseModel, Field


class SAESummary(BaseModel):
    name: str = Field(description="URL slug: /saes/{name}")
    model: str
    hook: str
    architecture: str
    d_in: int
    n_latents: int
    k: int | None
    metrics: dict = Field(
        description="eval.json of the SAE: l0, fvu, ce_score, delta_ce, kl, dead_fraction, ...; the feature-quality metrics of "
        "Gao et al. 2024 §4: probe_loss (nats, the mean over probe_tasks, each with name, per_class, loss and latent) and "
        "ablation_sparsity (mean (L1/L2)^2 / (V T) over `ablations` one-latent ablations); docs/concepts.md"
    )
    mined_tokens: int | None = Field(description="activation positions of the live mining run")
    alive: int | None = Field(description="features that fired at least once in the mining run")


class SAEDetail(SAESummary):
    train_config: dict
    benchmarks: list[dict] = Field(
        default_factory=list,
        description="saescope bench-sae results, one per seed (lowest first): seed, suite_version, computed_at, metrics (flat: l0, fvu, "
        "ce_loss_recovered, sparse_probing_top{1,2,5,20}_accuracy, llm_probe_accuracy, meta_sae_fvu, n2g_f1, absorption_fraction, ...), "
        "absorption_valid (false: the model's first-letter probe is too weak for absorption to mean anything), details; docs/concepts.md",
    )
    mining: dict | None = Field(description="the live mining run: id, corpus, finished_at, config")


class ModelSummary(BaseModel):
    name: str
    d_model: int
    n_layers: int
    vocab_size: int
    saes: list[SAESummary]


class FeatureSummary(BaseModel):
    index: int
    density: float = Field(description="share of mined positions where the feature is non-zero")
    max_act: float
    mean_act: float = Field(description="mean over the positions where it fires")
    n_fired: int
    top_token: str | None = Field(None, description="token its strongest context peaks on")
    explanation: str | None = Field(default=None, description="its N2G explanation in one line (see explanations on the feature)")
    explanation_score: float | None = Field(default=None, description="that explanation's held-out F1 (precision and recall)")


class FeaturePage(BaseModel):
    sae: str
    total: int
    offset: int
    limit: int
    features: list[FeatureSummary]


class TokenValue(BaseModel):
    token_id: int
    token: str
    value: float


class Neighbour(BaseModel):
    index: int
    cosine: float
    top_token: str | None = Field(None, description="token its strongest context peaks on")


class CoFiring(BaseModel):
    index: int
    count: int = Field(description="mined positions where both features fire")
    p_given: float = Field(description="P(this partner fires | the feature fires)")
    jaccard: float = Field(description="positions where both fire / positions where either fires")
    top_token: str | None = Field(None, description="token the partner's strongest context peaks on")


class FeatureDetail(FeatureSummary):
    sae: str
    n_latents: int
    histogram: dict = Field(description='{"edges": [bins+1], "counts": [bins]}: non-zero activations, equal-width bins over [min, max]')
    intervals: dict = Field(
        description='{"edges": [11], "shares": [10]}: equal-width intervals over [0, max] and the share of activations in each'
    )
    logits_top: list[TokenValue] = Field(description="tokens W_dec[i] @ W_U promotes most")
    logits_bottom: list[TokenValue] = Field(description="tokens it suppresses most")
    neighbours: list[Neighbour] = Field(description="nearest features by decoder cosine")
    coactivation: list[CoFiring] | None = Field(
        None, description="features that fire on the same mined tokens, strongest by Jaccard first; null: mined without co-activation"
    )
    explanation: str | None
    explanations: list[ExplanationOut] = Field([], description="one per method, best first (saescope explain)")


class ExplanationPattern(BaseModel):
    tokens: list[str | None] = Field(description="the pattern left to right, ending at the activating token; null is a wildcard")
    token_ids: list[int | None]
    examples: int = Field(description="build contexts whose activation this pattern explains")
    matches: int = Field(description="build positions the pattern matches")
    fired: int = Field(description="of those, positions where the feature fires")


class ExplanationOut(BaseModel):
    method: str = Field(description="n2g (token patterns) or llm (one line from a language model)")
    text: str
    patterns: list[ExplanationPattern]
    precision: float | None = Field(description="held-out: share of predicted positions where the feature fires")
    recall: float | None = Field(description="held-out: share of firing positions the explanation predicts")
    score: float | None = Field(description="n2g: F1 of precision and recall; llm: mean of detection and fuzzing")
    scores: dict = Field(description="method-specific counts and scores (docs/concepts.md)")


class ExampleKind(str, Enum):
    top = "top"
    interval = "interval"


class Example(BaseModel):
    kind: ExampleKind
    interval: int | None = Field(description="0-based activation interval for interval samples (lowest first)")
    rank: int
    doc_id: str
    doc_offset: int = Field(description="token offset of the chosen token in its document (-1: the separator after it)")
    tokens: list[str]
    token_ids: list[int]
    acts: list[float] = Field(description="this feature's activation at each token")
    max_act: float
    max_pos: int = Field(description="index in tokens of the chosen (for top examples: the strongest) token")


class ExamplePage(BaseModel):
    sae: str
    index: int
    kind: ExampleKind
    total: int
    offset: int
    limit: int
    examples: list[Example]


class SearchHit(BaseModel):
    sae: str
    index: int
    token: str = Field(description="the matching token its top contexts peak on")
    n_examples: int = Field(description="top contexts peaking on that token")
    max_act: float
    density: float


class ExplanationHit(BaseModel):
    sae: str
    index: int
    score: float = Field(description="reciprocal-rank fusion of the full-text and the semantic ranking")
    full_text_rank: int | None = Field(description="1-based rank among full-text matches, null when not matched")
    semantic_rank: int | None = Field(description="1-based rank by embedding cosine, null when outside the top")
    cosine: float | None = Field(description="cosine similarity of the phrase and the explanation (all-MiniLM-L6-v2)")
    explanation: str | None = Field(description="the feature's best explanation in one line")
    method: str | None
    explanation_score: float | None
    density: float | None


class SearchResult(BaseModel):
    query: str
    hits: list[SearchHit]
    features: list[ExplanationHit] = Field([], description="features ranked by meaning: their explanations, full text and semantic")
    notes: list[str] = Field([], description="e.g. that semantic search is unavailable in this install")


class Health(BaseModel):
    status: str
    schema_revision: str


class Problem(BaseModel):
    """The body of a 404 (and of any other error but 422): what was asked for and why it failed."""

    detail: str = Field(description='e.g. "no SAE named \'x\'" or "x has features 0..8191; there is no feature 9000"')
