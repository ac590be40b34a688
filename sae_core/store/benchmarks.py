"""The benchmark suite's results in the store (`sae_benchmarks`, one row per SAE and seed).

`save_benchmark` replaces the SAE's row for that seed in one transaction and marks the SAE's pages
changed; `read_benchmarks` gives an SAE's rows, lowest seed first (what the SAE page, its API and
/compare read). Rows travel as plain dicts: `results` is the flat {metric name: number} of
sae_core/evaluation/result.py's METRICS plus "absorption_valid" and "details" (the store does not import
the suite; evaluation.result.BenchResult.from_stored reads a StoredBenchmark back)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection, delete, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from ..errors import SaescopeError
from .changes import mark_changed
from .schema import SAE, SAEBenchmark, utcnow


@dataclass
class StoredBenchmark:
    sae: str
    seed: int
    suite_version: str
    results: dict  # flat metrics + "absorption_valid" + "details"
    saebench: list  # SAEBench BaseEvalOutput dicts (the core eval's per-latent details only in the JSON files)
    config: dict
    computed_at: datetime | None = None


def sae_id_of(conn: Connection | Session, name: str) -> int:
    sae_id = conn.execute(select(SAE.id).where(SAE.name == name)).scalar()
    if sae_id is None:
        known = conn.execute(select(SAE.name).order_by(SAE.name)).scalars().all()
        hint = f"; the store has {', '.join(known)}" if known else "; the store has no SAEs (saescope mine stores one)"
        raise SaescopeError(f"no SAE named {name!r} in the store{hint}")
    return int(sae_id)


def save_benchmark(engine: Engine, row: StoredBenchmark) -> int:
    """Store `row` for its SAE and seed (replacing an earlier one); returns the row's id."""
    with Session(engine) as s, s.begin():
        sae_id = sae_id_of(s, row.sae)
        s.execute(delete(SAEBenchmark).where(SAEBenchmark.sae_id == sae_id, SAEBenchmark.seed == row.seed))
        record = SAEBenchmark(
            sae_id=sae_id,
            suite_version=row.suite_version,
            seed=row.seed,
            results=row.results,
            saebench=row.saebench,
            config=row.config,
            computed_at=row.computed_at or utcnow(),
        )
        s.add(record)
        s.flush()
        new_id = record.id
        mark_changed(s, sae_id)
    return int(new_id)


def read_benchmarks(conn: Connection | Session, name: str) -> list[StoredBenchmark]:
    """The SAE's stored results, lowest seed first; [] when it was never benchmarked."""
    sae_id = sae_id_of(conn, name)
    rows = conn.execute(
        select(
            SAEBenchmark.seed,
            SAEBenchmark.suite_version,
            SAEBenchmark.results,
            SAEBenchmark.saebench,
            SAEBenchmark.config,
            SAEBenchmark.computed_at,
        )
        .where(SAEBenchmark.sae_id == sae_id)
        .order_by(SAEBenchmark.seed)
    ).all()
    return [StoredBenchmark(name, r.seed, r.suite_version, r.results, r.saebench, r.config, r.computed_at) for r in rows]
