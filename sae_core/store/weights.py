"""The SAE weights a mining run was mined with, kept in the store (`run_weights`, one row per run).

Why in the store: the live features (sae_core/live) must run exactly the SAE the pages describe, and a
server that has only the database (docker-compose's app container) has no access to the training
machine's folders. The row is written with the run's other rows, before the run becomes visible, and
is deleted with the run, so the live SAE and the pages switch together. The payload is one
safetensors file holding the SAE's tensors and its cfg.json (`interchange.sae_bytes`); an SAE's
~38 MB (8192 x 576, float32) is well inside what SQLite and PostgreSQL bytea hold.

Runs mined before the table existed have no row: `load_run_sae` then falls back to the SAE folder the
store names (`saes.path`), if this machine has it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Connection, insert, select
from sqlalchemy.orm import Session

from ..errors import SaescopeError
from .schema import SAE, RunWeights

if TYPE_CHECKING:
    from ..interchange import LoadedSAE

FORMAT = "safetensors"


def store_weights(s: Session, run_id: int, data: bytes) -> None:
    """Insert the weights of run `run_id` (inside the transaction that writes the run's rows)."""
    row = {"run_id": run_id, "format": FORMAT, "sha256": hashlib.sha256(data).hexdigest(), "n_bytes": len(data), "data": data}
    s.execute(insert(RunWeights), [row])


def read_weights(conn: Connection | Session, run_id: int) -> bytes | None:
    """The stored weights of a run, checked against their digest; None when the run has none."""
    row = conn.execute(select(RunWeights.format, RunWeights.sha256, RunWeights.data).where(RunWeights.run_id == run_id)).first()
    if row is None:
        return None
    if row.format != FORMAT:
        raise SaescopeError(f"run {run_id}'s weights are stored as {row.format!r}; this saescope reads {FORMAT!r}")
    data = bytes(row.data)
    if hashlib.sha256(data).hexdigest() != row.sha256:
        raise SaescopeError(f"run {run_id}'s stored weights do not match their sha256: re-mine the SAE (saescope mine --force)")
    return data


@dataclass(frozen=True)
class RunSAE:
    """Which SAE and run the live runtime serves, and where its weights came from."""

    name: str
    run_id: int
    model: str
    hook: str
    n_latents: int
    source: str  # "store" or the folder it was read from


def live_run(conn: Connection | Session, name: str) -> tuple[RunSAE, str] | None:
    """The SAE's visible run (and the SAE folder the store names), or None for an unknown or unmined SAE."""
    from .schema import Model

    row = conn.execute(
        select(SAE.name, SAE.active_run_id, SAE.hook, SAE.n_latents, SAE.path, Model.name.label("model"))
        .join(Model, Model.id == SAE.model_id)
        .where(SAE.name == name)
    ).first()
    if row is None or row.active_run_id is None:
        return None
    return RunSAE(row.name, row.active_run_id, row.model, row.hook, row.n_latents, "store"), row.path


def load_run_sae(conn: Connection | Session, name: str) -> tuple[RunSAE, LoadedSAE]:
    """(RunSAE, LoadedSAE) for the SAE's visible run: the weights stored with the run, else its folder."""
    from ..interchange import load_sae, load_sae_bytes

    found = live_run(conn, name)
    if found is None:
        raise SaescopeError(f"no mined SAE named {name!r} in the store")
    run, folder = found
    data = read_weights(conn, run.run_id)
    if data is not None:
        return run, load_sae_bytes(data, f"run {run.run_id}'s stored weights")
    if folder and Path(folder).is_dir():
        return RunSAE(run.name, run.run_id, run.model, run.hook, run.n_latents, folder), load_sae(folder)
    raise SaescopeError(
        f"run {run.run_id} of {name} has no weights in the store and its SAE folder {folder} is not on this machine: "
        f"re-mine it with this saescope (saescope mine {folder} --force) to store them"
    )
