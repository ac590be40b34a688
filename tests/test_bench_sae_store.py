"""sae_benchmarks: the suite's results stored per SAE and seed, read back whole, on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from sae_core.errors import SaescopeError
from sae_core.evaluation.result import METRICS, BenchResult
from sae_core.store import db
from sae_core.store.benchmarks import read_benchmarks, save_benchmark
from sae_core.store.schema import SAE, Model, SAEBenchmark


def _store_with_sae(url: str):
    engine = db.open_store(url, upgrade_schema=True)
    with Session(engine) as s, s.begin():
        model = Model(name="tiny", d_model=8, n_layers=2, vocab_size=10)
        s.add(model)
        s.flush()
        s.add(
            SAE(
                name="tiny-sae",
                model_id=model.id,
                hook="blocks.1.hook_resid_post",
                architecture="topk",
                d_in=8,
                n_latents=16,
                k=2,
                path="/x",
            )
        )
    return engine


def _result(seed: int, fvu: float) -> BenchResult:
    return BenchResult(
        sae="tiny-sae",
        seed=seed,
        metrics={"l0": 2.0, "fvu": fvu, "sparse_probing_top1_accuracy": 0.75, "absorption_first_letter_probe_f1": 0.42},
        absorption_valid=False,
        details={"sparse_probing": {"tasks": [{"name": "pos: noun", "top1": 0.75}]}},
        saebench=[{"eval_type_id": "core", "eval_result_metrics": {"sparsity": {"l0": 2.0}}}],
        config={"tokens": 1024},
    )


def _round_trip(url: str) -> None:
    engine = _store_with_sae(url)
    save_benchmark(engine, _result(0, 0.3).stored())
    save_benchmark(engine, _result(1, 0.31).stored())
    save_benchmark(engine, _result(0, 0.25).stored())  # the same seed again replaces its row
    with Session(engine) as s:
        got = [BenchResult.from_stored(r) for r in read_benchmarks(s, "tiny-sae")]
        revision = s.execute(select(SAE.revision)).scalar_one()
    assert [r.seed for r in got] == [0, 1]
    assert got[0].metrics["fvu"] == 0.25 and got[1].metrics["fvu"] == 0.31
    assert got[0].absorption_valid is False
    assert got[0].details == _result(0, 0.25).details
    assert got[0].saebench == _result(0, 0.25).saebench and got[0].config == {"tokens": 1024}
    assert set(got[0].metrics) <= set(METRICS)
    assert revision == 3  # each save marks the SAE's pages changed
    with pytest.raises(SaescopeError, match="no SAE named 'nope'.*tiny-sae"):
        save_benchmark(engine, BenchResult("nope", 0, {}).stored())
    with Session(engine) as s, s.begin():  # deleted with the SAE
        s.execute(delete(SAE))
    with Session(engine) as s:
        assert s.execute(select(SAEBenchmark)).first() is None
    engine.dispose()


def test_benchmarks_round_trip_sqlite(tmp_path):
    _round_trip(f"sqlite:///{tmp_path / 'store.db'}")


def test_benchmarks_round_trip_postgres(pg_url):
    _round_trip(pg_url)
