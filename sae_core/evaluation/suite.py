"""`saescope bench-sae`: the benchmark suite on one stored SAE (BenchConfig -> BenchResult).

One pass of `saescope eval`'s evaluation over held-out windows (evaluate.evaluate_loaded) gives the core
metrics, with CoreMeter and the sparse-probing collector riding on it as observers; then the sparse
probes are fitted, the meta-SAE trained on the decoder rows, the interpretability scores read (or N2G,
and the LLM's detection where an endpoint is configured, run on a sample), and the first-letter probe
measured (absorption only where it is accurate). The SAE is the one the store serves (its visible
mining run's weights), so the results describe the pages they are shown on.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator

from tqdm import tqdm

from ..errors import SaescopeError
from .config import BenchConfig
from .result import SUITE_VERSION, BenchResult

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from ..model import LanguageModel

STAGES = ("core metrics and probing data", "sparse probing", "meta-SAE", "interpretability", "absorption")


def run_suite(
    cfg: BenchConfig, lm: LanguageModel | None = None, progress: bool = True, engine: Engine | None = None
) -> tuple[BenchResult, str | None]:
    """Run every eval on the SAE `cfg.sae` of the store; returns the result and the SAE's folder on this
    machine (None where the store's weights are all there is)."""
    from pathlib import Path

    from .. import corpus as corpus_mod
    from ..evaluate import EvalConfig, evaluate_loaded
    from ..metrics.labels import TokenLabeller
    from ..model import load_model, parse_hook
    from ..store import db
    from ..store.benchmarks import sae_id_of
    from ..store.weights import load_run_sae
    from . import absorption, core, interpretability, meta_sae, saebench_json, sparse_probing

    if not cfg.sae:
        raise SaescopeError("name the SAE to benchmark: --sae NAME (saescope mine stored it)")
    cfg.llm_config()  # both or neither of --api-base and --llm-model: said before minutes of evaluation
    engine = engine or db.open_store(cfg.db)
    with engine.connect() as conn:
        sae_id_of(conn, cfg.sae)  # a clear error naming the store's SAEs
        run, loaded = load_run_sae(conn, cfg.sae)
    prov = loaded.provenance
    model_name, hook = prov.require(cfg.sae)
    layer = parse_hook(hook)
    lm = lm or load_model(model_name, cfg.device, cfg.model_dtype)
    sae = loaded.sae.to(lm.device)
    seconds: dict[str, float] = {}
    cpu_seconds: dict[str, float] = {}  # the process's CPU time (all threads): what a loaded machine's wall time hides
    bar = tqdm(total=len(STAGES), desc=f"bench-sae {cfg.sae}", unit="eval", disable=not progress, dynamic_ncols=True)

    @contextmanager
    def stage(name: str) -> Iterator[None]:
        bar.set_postfix_str(name)
        start, cpu = time.perf_counter(), time.process_time()
        yield
        seconds[name] = round(time.perf_counter() - start, 2)
        cpu_seconds[name] = round(time.process_time() - cpu, 2)
        bar.update(1)

    metrics: dict[str, float] = {}
    details: dict = {}
    with stage(STAGES[0]):
        meter = core.CoreMeter(sae.cfg.n_latents)
        labeller = TokenLabeller(corpus_mod.open_corpus(prov.corpus), lm.tokenizer)
        probing = sparse_probing.ProbingCollector(labeller, cfg.tokens)
        ev_cfg = EvalConfig(
            tokens=cfg.tokens,
            batch_size=cfg.batch_size,
            window_stride=cfg.window_stride,
            probe_per_class=0,
            ablation_positions=0,
            device=cfg.device,
            model_dtype=cfg.model_dtype,
        )
        ev = evaluate_loaded(loaded._replace(sae=sae), cfg.sae, ev_cfg, lm, progress=progress, observers=[meter, probing])
        m, details["core"], per_latent = core.core_metrics(ev, meter, sae)
        metrics.update(m)
    with stage(STAGES[1]):
        m, details["sparse_probing"] = sparse_probing.run_sparse_probing(probing, sae, cfg.probe_per_class, cfg.seed)
        metrics.update(m)
    with stage(STAGES[2]):
        m, details["meta_sae"] = meta_sae.meta_sae_metrics(sae.W_dec, cfg.meta_sae_latents, cfg.meta_sae_k, cfg.meta_sae_steps, cfg.seed)
        metrics.update(m)
    with stage(STAGES[3]):
        with engine.connect() as conn:
            m, details["interpretability"] = interpretability.interpretability_metrics(
                conn, run.run_id, cfg.n2g_features, cfg.seed, cfg.llm_config(), cfg.llm_features
            )
        metrics.update(m)
    with stage(STAGES[4]):
        m, valid, details["absorption"] = absorption.absorption_metrics(
            lm, layer, sae, cfg.absorption_words, cfg.absorption_min_f1, cfg.seed
        )
        metrics.update(m)
    bar.close()
    details["seconds"] = seconds
    details["cpu_seconds"] = cpu_seconds
    details["run_id"] = run.run_id
    config = {k: v for k, v in vars(cfg).items() if k != "db"}
    config.update(
        model=model_name,
        hook=hook,
        corpus=prov.corpus,
        context_size=prov.context_size,
        architecture=sae.architecture,
        n_latents=sae.cfg.n_latents,
    )
    result = BenchResult(cfg.sae, cfg.seed, metrics, valid, details, [], config, SUITE_VERSION, per_latent)
    result.saebench = saebench_json.eval_outputs(result, loaded.cfg)
    folder = run.source if run.source != "store" else None
    if folder is None:
        with engine.connect() as conn:
            from sqlalchemy import select

            from ..store.schema import SAE

            path = conn.execute(select(SAE.path).where(SAE.name == cfg.sae)).scalar()
        folder = path if path and Path(path).is_dir() else None
    return result, folder
