"""The benchmark suite's results in the store (`sae_benchmarks`, one row per SAE and seed).

`save_benchmark` replaces the SAE's row for that seed in one transaction and marks the SAE's pages
changed; `read_benchmarks` gives an SAE's rows, seed order, as BenchResult (what the SAE page, its API
and /compare read)."""

from __future__ import annotations

from sqlalchemy import Connection, delete, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from ..errors import SaescopeError
from ..evaluation.result import BenchResult
from .changes import mark_changed
from .schema import SAE, SAEBenchmark, utcnow


def sae_id_of(conn: Connection | Session, name: str) -> int:
    sae_id = conn.execute(select(SAE.id).where(SAE.name == name)).scalar()
    if sae_id is None:
        known = conn.execute(select(SAE.name).order_by(SAE.name)).scalars().all()
        hint = f"; the store has {', '.join(known)}" if known else "; the store has no SAEs (saescope mine stores one)"
        raise SaescopeError(f"no SAE named {name!r} in the store{hint}")
    return int(sae_id)


def save_benchmark(engine: Engine, result: BenchResult) -> int:
    """Store `result` for its SAE and seed (replacing an earlier one); returns the row's id."""
    with Session(engine) as s, s.begin():
        sae_id = sae_id_of(s, result.sae)
        s.execute(delete(SAEBenchmark).where(SAEBenchmark.sae_id == sae_id, SAEBenchmark.seed == result.seed))
        row = SAEBenchmark(
            sae_id=sae_id,
            suite_version=result.suite_version,
            seed=result.seed,
            results=result.results(),
            saebench=result.saebench,
            config=result.config,
            computed_at=utcnow(),
        )
        s.add(row)
        s.flush()
        new_id = row.id
        mark_changed(s, sae_id)
    return int(new_id)


def read_benchmarks(conn: Connection | Session, name: str) -> list[BenchResult]:
    """The SAE's stored results, lowest seed first; [] when it was never benchmarked."""
    sae_id = sae_id_of(conn, name)
    rows = conn.execute(
        select(SAEBenchmark.seed, SAEBenchmark.suite_version, SAEBenchmark.results, SAEBenchmark.saebench, SAEBenchmark.config)
        .where(SAEBenchmark.sae_id == sae_id)
        .order_by(SAEBenchmark.seed)
    ).all()
    return [BenchResult.from_row(name, r.seed, r.suite_version, r.results, r.saebench, r.config) for r in rows]
