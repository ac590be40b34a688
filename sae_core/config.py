"""The configuration of every stage, each option defined once: name, type, default and help live in
these fields (`options.option`), and the CLI (`saescope/cli.py`) and docs/configuration.md are built
from them. One light module on purpose: building the CLI imports no torch, so `saescope --help`
answers at once; each stage module re-exports its config (`from sae_core.cache import CacheConfig`).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Literal

from .errors import SaescopeError
from .options import corpus_option, db_option, device_option, hook_option, model_dtype_option, model_option, option


def default_workers() -> int:
    return min(os.cpu_count() or 1, 8)


@dataclass
class CacheConfig:
    """Everything `saescope cache` takes. The fields marked identity must match to resume."""

    model: str = model_option()  # identity
    hook: str = hook_option()  # identity
    corpus: str = corpus_option()  # identity
    context_size: int = option(128, "Tokens per window.")  # identity
    skip_positions: int = option(1, "Leading positions per window not stored (the attention sink).")  # identity
    seed: int = option(0, "Seed of the document order.")  # identity
    dtype: str = option("bfloat16", "Storage dtype: bfloat16, float16 or float32.")  # identity
    tokens: int = option(1_000_000, "Tokens to process (rounded up to whole windows); a re-run with more extends the cache.")
    batch_size: int = option(32, "Windows per forward pass.")
    windows_per_shard: int = option(256, "Windows per shard file (a multiple of --batch-size).")
    device: str = device_option()
    model_dtype: str = model_dtype_option()

    IDENTITY = ("model", "hook", "corpus", "context_size", "skip_positions", "seed", "dtype")

    def identity(self) -> dict:
        return {k: getattr(self, k) for k in self.IDENTITY}

    @property
    def n_windows(self) -> int:
        return -(-self.tokens // self.context_size)


@dataclass
class TrainConfig:
    """Everything `saescope train` takes. Fields marked identity must match to resume."""

    architecture: str = option(
        "topk",
        "topk; batchtopk (k on average over the batch, a learnt threshold at inference), jumprelu (learnt per-latent "
        "thresholds, an L0 penalty) or matryoshka_batchtopk (BatchTopK scored on nested prefixes too); "
        "relu for the ReLU + L1 baseline.",
    )
    n_latents: int = option(16384, "Dictionary size.")
    k: int = option(32, "Active latents per token (TopK; batchtopk and matryoshka_batchtopk: on average over each batch).")
    k_aux: int | None = option(None, "AuxK: dead latents used to model the residual (default d_in / 2).")
    aux_coef: float = option(1 / 32, "AuxK loss weight; 0 turns AuxK off.")
    multi_topk: bool = option(False, "Add L(4k)/8 so the code also works at larger k.")
    l1_coef: float = option(1e-2, "L1 penalty of the relu baseline.")
    l0_coef: float = option(1e-3, "JumpReLU: L0 penalty (larger: lower L0, higher FVU).")
    l0_warmup_steps: int = option(0, "JumpReLU: steps over which the L0 penalty grows linearly from 0 (the paper: 10k).", min=0)
    bandwidth: float = option(1e-3, "JumpReLU: width of the rectangle kernel of the threshold's straight-through estimator.")
    init_threshold: float = option(
        1e-3, "JumpReLU: every latent's threshold at the start (the paper's; thresholds move slowly, so short runs want more)."
    )
    prefix_sizes: str | None = option(
        None, "matryoshka_batchtopk: nested dictionary sizes scored on their own, comma-separated (default n/16,n/4; n is added)."
    )
    tied_init: bool = option(True, "Initialise W_enc as W_dec transposed.")
    geometric_median_init: bool = option(True, "Initialise b_pre at the geometric median of a sample of inputs.")
    lr: float | None = option(None, "Adam learning rate (default 2e-4 / sqrt(n_latents / 2^14)).")
    adam_eps: float = option(6.25e-10, "Adam epsilon.")
    batch_size: int = option(4096, "Tokens per step.")
    tokens: int | None = option(
        None,
        "Training tokens (default: one pass over the cache; more repeats it). "
        "Required when streaming: the model runs over this many corpus tokens once.",
    )
    dead_tokens: int | None = option(None, "Tokens without firing before a latent counts as dead (default min(10M, tokens/10)).")
    ema: float | None = option(None, "Weight EMA decay, e.g. 0.999; the saved weights are the EMA.")
    bf16: bool = option(
        False,
        "TopK: encoder and AuxK matmuls in bf16 numerics (faster on bf16 hardware: config A 8.1k vs 4.7k tok/s "
        "with AVX512-BF16; elsewhere an fp32 GEMM over bf16-rounded operands gives the same numbers as fast "
        "as fp32; bench/RESULTS.md).",
    )
    compile: bool = option(
        False,
        "TopK in one process: run the loss and gradients as one torch.compile graph (on CUDA replayed as a CUDA graph: "
        "one launch instead of ~110). Same results up to the order of float sums, so resume is no longer bitwise; "
        "the first steps compile (up to a minute). For CUDA: on the CPU the eager step is faster (bench/RESULTS.md).",
    )
    seed: int = option(0, "Seed of the initialisation and the batch order.")
    checkpoint_every: int = option(200, "Steps between checkpoints.")
    device: str = option(
        "auto",
        "auto (CUDA when present), cpu, cuda or cuda:N. A resumed run is bitwise the uninterrupted one "
        "on the CPU at the same thread count; on a GPU, atomic adds may sum in another order.",
    )
    latent_parallel: int = option(
        1,
        "Under torchrun: ranks that split the latents between them (TopK); the world size over this is the "
        "data-parallel factor. --batch-size is the global batch (docs/deployment.md).",
        min=1,
    )

    transcoders: str | None = option(
        None,
        "Train transcoders instead, one per layer, all in one pass over streamed tokens: `all` or layers such as 0,1,5 "
        "(each reads blocks.L.hook_mlp_in and predicts blocks.L.hook_mlp_out; folders --out/layer_L). --architecture "
        "skip_transcoder (the default here) or transcoder; --n-latents defaults to 4096 here.",
    )

    NOT_IDENTITY = ("checkpoint_every", "device", "latent_parallel", "compile", "transcoders")  # the layout is checked on resume

    def identity(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in self.NOT_IDENTITY}


@dataclass
class EvalConfig:
    tokens: int = option(65536, "Held-out tokens (the corpus windows after the training cache).")
    batch_size: int = option(8, "Windows per forward pass (full logits are [batch, context, vocab]).")
    window_stride: int = option(
        16,
        "One held-out window in every N, so that they come from many documents and sources (consecutive "
        "windows can all fall in one long document); smaller where the corpus has fewer left.",
        min=1,
    )
    probe_per_class: int = option(
        2048, "Probe loss: held-out tokens per class of each task (balanced; fewer where the corpus has fewer); 0 skips it.", min=0
    )
    probe_candidates: int = option(
        128, "Probe loss: latents fitted per task, those most correlated with its labels; 0 fits every latent (the paper's way).", min=0
    )
    ablation_positions: int = option(
        16, "Ablation sparsity: token positions whose active latents are ablated one at a time; 0 skips it.", min=0
    )
    ablation_horizon: int = option(
        16, "Ablation sparsity: positions, from the ablated one on, whose logits are compared (the paper's T).", min=1
    )
    device: str = device_option()
    model_dtype: str = model_dtype_option()


@dataclass
class StatsConfig:
    top_n: int = option(32, "Top-activating contexts kept per feature (at most one per window).")
    n_intervals: int = option(10, "Equal-width activation intervals over [0, max] to sample from.")
    per_interval: int = option(5, "Samples per interval (uniform within it).")
    histogram_bins: int = option(
        50, "Bins of the activation histogram (equal width, from the smallest to the largest non-zero activation)."
    )
    context_before: int = option(23, "Tokens kept before an example's chosen token (32-token contexts by default).")
    context_after: int = option(8, "Tokens kept after it.")
    seed: int = option(0, "Seed of the interval sampling.")

    def __post_init__(self) -> None:
        for name in ("top_n", "n_intervals", "per_interval", "histogram_bins"):
            if getattr(self, name) < 1:
                raise SaescopeError(f"{name.replace('_', '-')} must be at least 1 (got {getattr(self, name)})")
        if self.context_before < 0 or self.context_after < 0:
            raise SaescopeError("context-before and context-after must not be negative")


@dataclass
class MineConfig:
    tokens: int = option(262_144, "Corpus tokens to mine, from the corpus start (whole windows).")
    corpus: str | None = option(None, "Corpus spec (default: the one the SAE was trained on).")
    stats: StatsConfig = field(default_factory=StatsConfig)
    n_logits: int = option(10, "Top and bottom tokens of a feature's decoder row through the unembedding (W_dec @ W_U) kept per feature.")
    n_neighbours: int = option(10, "Nearest features by decoder cosine kept per feature.")
    coactivation: int = option(
        16, "Co-firing features kept per feature (by Jaccard index), counted from the mined codes in the statistics sweep; 0: none.", min=0
    )
    max_active: int = option(
        256,
        "SAEs without a fixed k per position (relu, jumprelu, batchtopk, matryoshka_batchtopk): positions keep their "
        "largest this-many activations.",
    )
    batch_size: int = option(16, "Windows per forward pass.")
    windows_per_chunk: int = option(256, "Windows per work chunk: the unit a killed run resumes from.")
    shard: str | None = option(
        None,
        "Mine only part I/N of the windows, e.g. 0/4 (whole chunks, into the SAE folder), and stop; "
        "--merge-shards N then publishes the parts. Under torchrun each rank mines its part and rank 0 publishes.",
    )
    merge_shards: int | None = option(
        None, "Publish the N parts mined with --shard as one run: exactly what one process over the same windows stores.", min=1
    )
    name: str | None = option(None, "The SAE's name in the store and its URLs (default: the folder name).")
    db: str | None = db_option()
    force: bool = option(False, "Re-mine even when the store already holds a run with these settings.")
    device: str = device_option()
    model_dtype: str = model_dtype_option()


@dataclass
class ExplainConfig:
    """Everything `saescope explain` takes (sae_core/explain; the methods in docs/concepts.md)."""

    method: Literal["n2g", "llm"] = option("n2g", "n2g (token patterns from the mined contexts, no model needed) or llm.")
    fire_fraction: float = option(0.5, "A position fires when its activation exceeds this fraction of the feature's max.")
    max_pattern_len: int = option(5, "N2G: longest pattern, in tokens, the activating one included.", min=1, max=24)
    min_precision: float = option(
        0.7,
        "N2G: a pattern is pruned or wildcarded only while this share of its other matches in the build half still fire "
        "(Laplace-smoothed).",
    )
    max_patterns: int = option(10, "N2G: patterns kept per feature (the most supported).", min=1)
    features: int | None = option(None, "Explain only the first this-many fired features (a quick look).", min=1)
    batch_features: int | None = option(
        None, "Features per committed batch: the unit a killed run resumes from.", min=1, show_default="256 for n2g, 4 for llm"
    )
    embed: bool = option(True, "Store each explanation's sentence embedding for semantic search (all-MiniLM-L6-v2).")
    force: bool = option(False, "Explain again the features that already hold an explanation of this method.")
    api_base: str | None = option(None, "LLM: base URL of an OpenAI-compatible API, e.g. http://127.0.0.1:8080/v1.")
    model: str | None = option(None, "LLM: the model name the endpoint serves.")
    api_key_env: str = option("OPENAI_API_KEY", "LLM: environment variable holding the API key (never stored or logged).")
    requests_per_minute: float = option(600.0, "LLM: rate limit of requests to the endpoint.", min=0.1)
    llm_examples: int = option(10, "LLM: examples shown to the explainer and to each scorer.", min=1)
    db: str | None = db_option()


@dataclass
class MapConfig:
    """Everything `saescope map` takes (sae_core/relations/map.py): a 2-D UMAP of the alive features' decoder rows."""

    seed: int = option(0, "UMAP's random_state: the same seed, store and SAE give the same map.")
    n_neighbors: int = option(
        15, "UMAP: nearest features (see --neighbours) each feature is tied to; more keeps more global shape.", min=2, max=200
    )
    min_dist: float = option(0.1, "UMAP: how tightly points may pack on the map.", min=0.0, max=1.0)
    neighbours: str = option(
        "decoder",
        "What ties a feature to its neighbours: decoder (cosine of decoder rows, the papers' map) or coactivation (the features "
        "that fire on the same tokens, by Jaccard index, as mining stored them: a small SAE's near-orthogonal decoders give a "
        "featureless disk, its co-firing gives islands).",
    )
    min_cluster_size: int | None = option(
        None, "HDBSCAN on the map: the fewest features a cluster holds.", min=2, show_default="alive features / 400, at least 10"
    )
    force: bool = option(False, "Compute the map again even though the SAE's live run has one.")
    keep_existing: bool = option(
        False, "Leave a map the live run already has, whatever its settings (the demo's rerun over an older demo's store).", cli=False
    )
    db: str | None = db_option()


@dataclass
class FamilyConfig:
    """Everything `saescope family` takes besides the SAEs (sae_core/relations/families.py)."""

    sample_tokens: int = option(
        16_384, "Activation positions every SAE encodes to confirm matches by co-activation (training cache, else the model).", min=1
    )
    min_cosine: float = option(0.4, "Split: the least decoder cosine between a parent and a child.", min=-1.0, max=1.0)
    match_cosine: float = option(0.7, "Equal widths: the least decoder cosine to call two features the same feature.", min=-1.0, max=1.0)
    min_coactivation: float = option(
        0.2, "The least share of a child's (or match's) firing positions on which the other feature fires too.", min=0.0, max=1.0
    )
    seed: int = option(0, "Seed of the activation sample.")
    db: str | None = db_option()
    device: str = device_option()
    model_dtype: str = model_dtype_option()


@dataclass
class DemoConfig:
    """Defaults chosen so the first run takes minutes on a 2-core laptop CPU and the features read well."""

    # layer 8, a third of the way up SmolLM2's 30 layers: word- and phrase-level features
    hook: str = hook_option()
    cache_tokens: int = option(500_000, "Tokens of activations to cache.")
    n_latents: int = option(8192, "SAE width.")
    k: int = option(32, "Active latents per token.")
    train_tokens: int = option(1_000_000, "Training tokens (more than the cache repeats it).")
    eval_tokens: int = option(16_384, "Held-out tokens for the evaluation.")
    mine_tokens: int = option(200_000, "Tokens to mine feature contexts from.")
    name: str = option("smollm2-135m-L8-topk-8k", "The SAE's name in URLs.")
    family: bool = option(
        False, "Also train a 4x narrower and a 4x wider SAE on the same cache, mine and explain them, and build the family relations."
    )
    circuits: bool = option(
        False,
        "Also train a transcoder for every layer, trace the attribution graph of --circuits-prompt, and mine and explain "
        "the layers its features sit on, so the graph's nodes open feature pages.",
    )
    circuits_tokens: int = option(512_000, "--circuits: tokens the transcoders train on (one model pass for all layers).", min=1024)
    circuits_prompt: str = option(
        # two steps: Madrid -> Spain -> Spanish (the bundled model answers ' Spanish', p 0.28)
        "The official language of the country whose capital is Madrid is",
        "--circuits: the prompt whose next-token prediction the demo's graph explains.",
    )
    circuits_mine_tokens: int = option(32_768, "--circuits: tokens to mine each graph layer's transcoder features from.", min=128)
    db: str | None = db_option()
    device: str = device_option()
    model_dtype: str = model_dtype_option()


def default_live_threads() -> int:
    return max(1, (os.cpu_count() or 2) // 2)


@dataclass
class LiveConfig:
    """The live features (sae_core/live): running the model on the user's text and steering it. One model
    process per server, apart from the page handlers; its limits are what the API answers 422 or 503 beyond."""

    live_device: str = device_option()
    live_model_dtype: str = option(
        "auto", "dtype of the live model: auto (bf16 where the hardware computes it natively), float32, bfloat16."
    )
    live_threads: int = option(
        default_factory=default_live_threads,
        help="Torch threads of the model process (it also runs at a lower priority, so pages keep their cores).",
        show_default="half the CPU cores, at least 1",
        min=1,
    )
    live_nice: int = option(
        10,
        "Niceness of the model process: above 0 the page workers get the CPU first (0 on a machine busy with other work).",
        min=0,
        max=19,
    )
    live_queue: int = option(4, "Requests that may wait for the model beyond the one it runs; more get 503 with Retry-After.", min=0)
    live_time_limit: float = option(30.0, "Seconds a generation may run (it stops there and says so).", min=0.1)
    live_sweep_time_limit: float = option(
        120.0,
        "Seconds a strength sweep may run as a whole (its generations together; cut short, it says so and is not stored).",
        min=0.1,
    )
    graph_time_limit: float = option(
        180.0,
        "Seconds an attribution graph build asked of the live model (POST /api/v1/trace, the /graphs page) may run; past it "
        "the build stops with an error. A 16-token graph of the bundled model takes 4-25 s on 2 cores, 64 tokens 14-60 s.",
        min=0.01,
    )
    max_text_tokens: int = option(1024, "Longest text the activations endpoint reads, in tokens (a longer one is read up to there).", min=1)
    max_prompt_tokens: int = option(256, "Longest steering prompt, in tokens (a longer one is continued from its last ones).", min=1)
    max_new_tokens_limit: int = option(256, "Most new tokens a steering request may ask for.", min=1)
    max_interventions: int = option(8, "Most features one steering request may change.", min=1)


@dataclass
class GenerationConfig:
    """How a steered continuation is sampled; the same settings and seed give the same tokens (for a given
    model dtype and machine kind)."""

    max_new_tokens: int = option(32, "Tokens to generate.", min=1)
    temperature: float = option(0.0, "Sampling temperature; 0 is greedy decoding.", min=0.0)
    top_p: float = option(1.0, "Nucleus sampling: keep the smallest set of tokens whose probability reaches this.", min=0.0, max=1.0)
    seed: int = option(0, "Seed of the sampling (ignored when greedy).")


@dataclass
class AuthConfig:
    """Accounts, sessions and API keys (app/accounts), and the fair-use limits on the model. Accounts are off
    unless --auth; the limits on the model apply either way where set."""

    auth: bool = option(
        False, "Accounts: sign-in, roles and API keys (users come from `saescope user add`).", param_decls=["--auth/--no-auth"]
    )
    anonymous: Literal["live", "read", "none"] = option(
        "read",
        "With --auth, what visitors not signed in may do: read pages and the API (read), also use the model (live), or nothing (none).",
    )
    cookie_secure: Literal["auto", "always", "never"] = option(
        "auto", "Secure flag of the session cookie; auto: when the request came over HTTPS (X-Forwarded-Proto from a trusted proxy counts)."
    )
    session_hours: float = option(12.0, "Hours a sign-in lasts.", min=0.01)
    login_failures: int = option(5, "Failed sign-ins in a row that lock an account.", min=1)
    lockout_minutes: float = option(15.0, "Minutes a locked account stays locked.", min=0.0)
    login_per_minute: int = option(10, "Sign-in attempts per minute from one address (0: no limit).", min=0)
    live_per_minute: int = option(60, "Model requests per minute per API key or signed-in user (0: no limit).", min=0)
    live_per_minute_address: int = option(
        0, "Model requests per minute per address of a client that is not signed in (0: no limit).", min=0
    )
    oidc_issuer: str | None = option(
        None, "OpenID Connect provider for single sign-on: its issuer URL (its /.well-known/openid-configuration is read)."
    )
    oidc_client_id: str | None = option(None, "This server's client id at the OIDC provider (its secret: $SAESCOPE_OIDC_CLIENT_SECRET).")
    oidc_role: Literal["viewer", "editor", "admin", "none"] = option(
        "viewer", "Role of someone the OIDC provider signs in for the first time (none: only users linked by an admin)."
    )
    oidc_name: str = option("single sign-on", "What the sign-in page calls the OIDC provider.")


@dataclass
class ServeConfig:
    db: str | None = db_option()
    host: str = option("127.0.0.1", "Interface to listen on (0.0.0.0 to share on the network).")
    port: int = option(8000, "Port to listen on.")
    workers: int = option(
        default_factory=default_workers,
        help="Server processes (each ~80 MB; they share the store).",
        show_default="one per CPU core, at most 8",
    )
    loop: Literal["asyncio", "uvloop"] = option(
        "asyncio",
        "Event loop. uvloop answers trivial requests faster but lets a busy worker starve some connections (bench/RESULTS.md, Serving).",
    )
    db_threads: int | None = option(
        None,
        "Threads per process that run database reads; 0 runs them on the event loop.",
        min=0,
        show_default="0 for SQLite or PostgreSQL on this machine, else 4",
    )
    response_cache_mb: int = option(
        64, "Megabytes per server process for rendered pages and API answers of live runs (0: no cache).", min=0
    )
    upgrade: bool = option(False, "Apply the schema migrations first (what the container does at start).")
    wait_for_db: float = option(0.0, "Seconds to keep retrying an unreachable database before giving up.")
    live: bool = option(
        True,
        "Run the model for the live pages and endpoints (activations on your text, steering); --no-live serves the store only.",
        param_decls=["--live/--no-live"],
    )
    live_options: LiveConfig = field(default_factory=LiveConfig)
    auth_options: AuthConfig = field(default_factory=AuthConfig)


@dataclass
class BenchConfig:
    """Everything `saescope bench-sae` takes (sae_core/evaluation; the metrics in docs/concepts.md)."""

    sae: str = option("", "The SAE to benchmark: its name in the store (saescope mine stored it).", param_decls=["--sae"])
    seed: int = option(
        0,
        "Seed of the suite's random draws (probe splits and classes, meta-SAE, N2G sample, absorption words); one stored result per seed.",
    )
    tokens: int = option(
        32768, "Held-out tokens (the corpus windows after the training cache): core metrics, and the sparse-probing tasks' examples.", min=1
    )
    batch_size: int = option(8, "Windows per forward pass.", min=1)
    window_stride: int = option(16, "One held-out window in every N (windows from many documents and sources).", min=1)
    probe_per_class: int = option(
        1024, "Sparse probing: examples per class of each task and split (balanced; fewer where the corpus has fewer).", min=8
    )
    meta_sae_latents: int = option(0, "Meta-SAE: latents (0: a quarter of the SAE's latents).", min=0)
    meta_sae_k: int = option(4, "Meta-SAE: active meta-latents per decoder row (TopK).", min=1)
    meta_sae_steps: int = option(1500, "Meta-SAE: training steps (Adam at 5e-4, batches of 1024 decoder rows; SAEBench's 1500).", min=1)
    absorption_min_f1: float = option(
        0.8, "Absorption runs only where the model's first-letter probes reach this mean F1 (SAEBench assumes accurate probes)."
    )
    absorption_words: int = option(
        1500, "Absorption: vocabulary words (single tokens, a space and letters) read by the first-letter probes.", min=52
    )
    n2g_features: int = option(512, "Interpretability: features scored by N2G when the store has no N2G explanations of the SAE.", min=1)
    api_base: str | None = option(
        None,
        "Interpretability: base URL of an OpenAI-compatible API (as saescope explain --api-base); with --llm-model, an LLM explains "
        "a seeded sample of features and delphi-style detection scores them here (nothing is written to the explanations).",
    )
    llm_model: str | None = option(None, "Interpretability: the model name the endpoint serves (saescope explain's --model).")
    api_key_env: str = option("OPENAI_API_KEY", "Interpretability: environment variable holding the API key (never stored or logged).")
    requests_per_minute: float = option(600.0, "Interpretability: rate limit of requests to the endpoint.", min=0.1)
    llm_features: int = option(32, "Interpretability: features the LLM explains and detection-scores (seeded sample of fired ones).", min=1)
    llm_examples: int = option(10, "Interpretability: examples shown to the LLM explainer and to the detection scorer.", min=1)
    db: str | None = db_option()
    device: str = device_option()
    model_dtype: str = model_dtype_option()

    def llm_config(self) -> ExplainConfig | None:
        """saescope explain's LLM settings from these options; None where no endpoint is configured."""
        if not self.api_base and not self.llm_model:
            return None
        if not self.api_base or not self.llm_model:
            raise SaescopeError("LLM detection scoring needs both --api-base URL (an OpenAI-compatible API) and --llm-model NAME")
        return ExplainConfig(
            method="llm",
            api_base=self.api_base,
            model=self.llm_model,
            api_key_env=self.api_key_env,
            requests_per_minute=self.requests_per_minute,
            llm_examples=self.llm_examples,
            db=self.db,
        )


SECTIONS = [
    (CacheConfig, "saescope cache"),
    (TrainConfig, "saescope train"),
    (EvalConfig, "saescope eval"),
    (MineConfig, "saescope mine"),
    (StatsConfig, "saescope mine: feature statistics"),
    (ExplainConfig, "saescope explain"),
    (BenchConfig, "saescope bench-sae"),
    (MapConfig, "saescope map"),
    (ServeConfig, "saescope serve"),
    (LiveConfig, "saescope serve: live features"),
    (AuthConfig, "saescope serve: accounts and limits"),
    (GenerationConfig, "saescope steer: generation settings"),
    (FamilyConfig, "saescope family"),
    (DemoConfig, "saescope demo"),
]
BEGIN, END = "<!-- BEGIN generated by `make docs` from sae_core/config.py; do not edit by hand -->", "<!-- END generated -->"


def reference() -> str:
    """The generated part of docs/configuration.md: every option of every stage."""
    from .options import markdown_table

    return "\n".join([BEGIN, "", *(markdown_table(cls, title) for cls, title in SECTIONS), END])


def write_reference(path: str) -> None:
    """Replace the generated part of `path` (between BEGIN and END) with `reference()`."""
    from pathlib import Path

    doc = Path(path)
    text = doc.read_text()
    head, rest = text.split(BEGIN, 1) if BEGIN in text else (text.rstrip() + "\n\n", END)
    doc.write_text(head + reference() + rest.split(END, 1)[1])
