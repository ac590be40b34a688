"""`saescope map`: a 2-D map of an SAE's alive features, where related features sit together.

Anthropic's "Scaling Monosemanticity" reads features through such neighbourhoods: a UMAP of decoder
directions under the cosine metric. Here:

    decoder rows of the features that fired in mining (the live run's), normalised
      -> exact cosine k-nearest neighbours (blocks of KNN_BLOCK rows, the running result kept on disk); or, with
         `neighbours="coactivation"`, the co-firing partners mining stored (1 - Jaccard): a small SAE's decoder rows
         are nearly orthogonal (the demo's 8k: nearest-neighbour cosine median 0.23, 0.16 for random directions), so
         their map is a featureless disk, while what fires together forms islands (bench/RESULTS.md)
      -> UMAP layout from that graph (umap-learn, random_state = seed: the same seed gives the same map)
      -> HDBSCAN clusters on the map (scikit-learn; leaf clusters), numbered by size
      -> each point's MAP_NEIGHBOURS nearest features on the map, and a coarse density grid
      -> feature_maps + feature_map_points, written in one transaction with the SAE's revision bumped

Resumable: the kNN blocks and the finished layout are kept in a work folder under the data directory
(one per store, SAE and run, checked against a digest of the decoder rows), so a killed run resumes
at the first unfinished block row of the kNN, and one killed while clustering or writing does not lay out again. A
run that already has a map with these settings is left alone unless `force` (which also discards
the work folder, so a forced map is computed from nothing).

The exact kNN costs n^2 d / 2 multiply-adds (65k x 576: ~1.2 T, minutes on 2 cores) and the layout
runs on one thread (a seeded UMAP does): docs/deployment.md says what a 1M-feature map needs.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import orjson
import torch
from sqlalchemy import Connection, Engine, Row, delete, insert, select
from sqlalchemy.orm import Session

from .. import settings
from ..config import MapConfig
from ..errors import SaescopeError
from ..store import db
from ..store.bulk import load_rows
from ..store.changes import mark_changed
from ..store.schema import SAE, Feature, FeatureMap, FeatureMapPoint

__all__ = ["MapConfig", "MapResult", "Layout", "build_map", "compute_layout", "map_info", "map_points", "map_point", "tqdm_progress"]

Progress = Callable[[str, int, int], None]  # (stage, done, total); stages: STAGES
STAGES = {"neighbours": "cosine kNN (block pairs)", "layout": "UMAP layout (epochs)", "clusters": "clusters", "write": "store"}
KNN_BLOCK = 4096  # rows per kNN block; a killed run resumes at the first unfinished block row
MAP_NEIGHBOURS = 8  # nearest features on the map, listed on each feature page
HDBSCAN_MIN_SAMPLES = 3  # neighbours that make a point a core point of a cluster
GRID = 48  # cells per side of the density grid the feature page's inset draws


@dataclass(frozen=True)
class MapResult:
    sae_name: str
    run_id: int
    n_points: int  # alive features on the map
    n_clusters: int
    seed: int
    seconds: float  # 0 when skipped
    skipped: bool  # the run already had this map: nothing was computed
    timings: dict[str, float]  # seconds per stage


@dataclass(frozen=True)
class Layout:
    """A computed map of n rows: what `write_map` stores."""

    xy: np.ndarray  # [n, 2] float32
    clusters: np.ndarray  # [n] int, -1: no cluster; 0 is the largest
    neighbours: np.ndarray  # [n, MAP_NEIGHBOURS] row positions, nearest first
    distances: np.ndarray  # [n, MAP_NEIGHBOURS] map distances
    grid: dict
    min_cluster_size: int
    timings: dict[str, float]


def _quiet(stage: str, done: int, total: int) -> None:
    pass


def tqdm_progress() -> Progress:
    """A progress callback drawing one tqdm bar per stage (what the CLI passes)."""
    from tqdm import tqdm

    bars: dict[str, tqdm] = {}

    def update(stage: str, done: int, total: int) -> None:
        bar = bars.get(stage)
        if bar is None:
            bar = bars[stage] = tqdm(
                total=total,
                desc=STAGES.get(stage, stage),
                dynamic_ncols=True,
                bar_format="{l_bar}{bar}| {n}/{total} [{elapsed}<{remaining}]",
            )
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    return update


class _EpochSink:
    """A file for UMAP's epoch bar (umap-learn draws it with tqdm and takes no callback): with
    bar_format "{n}/{total}" each write is the epochs done, handed on to the progress callback."""

    def __init__(self, progress: Progress):
        self.progress = progress

    def write(self, text: str) -> None:
        if m := re.search(r"(\d+)/(\d+)", text):
            self.progress("layout", int(m.group(1)), int(m.group(2)))

    def flush(self) -> None:
        pass


def _unit_rows(rows: np.ndarray) -> np.ndarray:
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)


def _merge(best_s: torch.Tensor, best_i: torch.Tensor, rows: slice, sims: torch.Tensor, cols: int, k: int) -> None:
    """Fold one block of similarities (its columns start at row `cols`) into `rows`' running top k."""
    s, j = torch.topk(sims, min(k, sims.shape[1]), dim=1)
    s, j = torch.cat([best_s[rows], s], dim=1), torch.cat([best_i[rows], j + cols], dim=1)
    top, at = torch.topk(s, k, dim=1)
    best_s[rows], best_i[rows] = top, torch.gather(j, 1, at)


def cosine_knn(unit: np.ndarray, k: int, work: Path | None, progress: Progress) -> tuple[np.ndarray, np.ndarray]:
    """The exact k nearest rows by cosine, each row's first neighbour itself (as UMAP expects): (indices
    [n, k] int64, cosine distances [n, k] float32).

    Blocks of KNN_BLOCK rows; the similarity matrix is symmetric, so each pair of blocks is multiplied
    once and folded into both blocks' running top k (half the n^2 d multiply-adds of a plain search).
    After each block row the running state goes to `work`, and a re-run starts from the first block
    row not finished. (An inverted-file index was tried above 32k rows and dropped: on decoder-shaped
    rows faiss's IVF search was slower than this, its scans being no matrix products, at recall 0.5-0.6.)"""
    n = len(unit)
    k = min(k, n)
    x = torch.from_numpy(unit)
    starts = list(range(0, n, KNN_BLOCK))
    best_s, best_i = torch.full((n, k), -np.inf), torch.full((n, k), -1, dtype=torch.int64)
    first = 0
    state = work / f"knn-{k}.npz" if work is not None else None
    if state is not None and state.exists():
        with np.load(state) as saved:
            best_s, best_i, first = torch.from_numpy(saved["sims"]), torch.from_numpy(saved["ids"]), int(saved["next_block"])
    pairs = len(starts) * (len(starts) + 1) // 2
    done = sum(len(starts) - b for b in range(first))
    with torch.inference_mode():
        for b in range(first, len(starts)):
            rows = slice(starts[b], min(starts[b] + KNN_BLOCK, n))
            for c in range(b, len(starts)):
                cols = slice(starts[c], min(starts[c] + KNN_BLOCK, n))
                sims = x[rows] @ x[cols].T
                _merge(best_s, best_i, rows, sims, cols.start, k)
                if c != b:
                    _merge(best_s, best_i, cols, sims.T, rows.start, k)
                done += 1
                progress("neighbours", done, pairs)
            if state is not None:
                partial = state.with_suffix(".tmp.npz")
                np.savez(partial, sims=best_s.numpy(), ids=best_i.numpy(), next_block=b + 1)
                partial.replace(state)  # whole block rows only: a kill mid-write leaves the previous state
    knn = best_i.numpy().copy()
    dist = np.clip(1.0 - best_s.numpy(), 0.0, 2.0).astype(np.float32)
    # A feature whose decoder row duplicates another's may come second in its own list: put itself first.
    for row in np.flatnonzero(knn[:, 0] != np.arange(n)):
        others = [int(j) for j in knn[row] if j != row][: k - 1]
        knn[row] = np.array([row, *others], dtype=np.int64)
        dist[row] = [0.0, *np.clip(1.0 - unit[others] @ unit[row], 0.0, 2.0)]
    return knn, dist


def umap_layout(unit: np.ndarray, knn: np.ndarray, dist: np.ndarray, cfg: MapConfig, progress: Progress) -> np.ndarray:
    """UMAP of the rows from their precomputed cosine kNN graph; deterministic for a given seed."""
    import umap

    reducer = umap.UMAP(
        n_neighbors=cfg.n_neighbors,
        min_dist=cfg.min_dist,
        metric="cosine",
        random_state=cfg.seed,
        precomputed_knn=(knn[:, : cfg.n_neighbors], dist[:, : cfg.n_neighbors], None),
        low_memory=True,
        tqdm_kwds={"disable": False, "file": _EpochSink(progress), "bar_format": "{n}/{total}", "mininterval": 0.5, "position": 1},
    )
    with warnings.catch_warnings():
        # A seed makes umap-learn run its layout on one thread (that is what makes it reproducible) and it says so.
        warnings.filterwarnings("ignore", message="n_jobs value .* overridden")
        # and that without its own kNN index it cannot place new points later (the map never does)
        warnings.filterwarnings("ignore", message=r"precomputed_knn\[2\]")
        xy = reducer.fit_transform(unit)
    return np.asarray(xy, dtype=np.float32)


def _clusters(xy: np.ndarray, min_cluster_size: int) -> np.ndarray:
    """HDBSCAN on the map, clusters renumbered by size (0 the largest) so colours follow size."""
    from sklearn.cluster import HDBSCAN

    # Leaf clusters from a light smoothing: a real SAE's map is one large body with fine structure, where
    # HDBSCAN's default (excess of mass) swung between 2 and 134 clusters on the demo's 8k features as
    # min_samples moved from 5 to 3; leaves stayed at 111-144 clusters (a third to two fifths noise).
    labels = HDBSCAN(
        min_cluster_size=min_cluster_size,
        min_samples=min(HDBSCAN_MIN_SAMPLES, min_cluster_size),
        cluster_selection_method="leaf",
        copy=False,
    ).fit_predict(xy.astype(np.float64))
    found, counts = np.unique(labels[labels >= 0], return_counts=True)
    order = found[np.lexsort((found, -counts))]
    renumber = np.full(int(labels.max()) + 2, -1)
    renumber[order] = np.arange(len(order))
    return renumber[labels]


def _map_neighbours(xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from scipy.spatial import cKDTree

    n = len(xy)
    k = min(MAP_NEIGHBOURS, n - 1)
    dist, idx = cKDTree(xy.astype(np.float64)).query(xy.astype(np.float64), k=k + 1)
    # drop each point itself (not always column 0 when two points coincide)
    keep = idx != np.arange(n)[:, None]
    keep[keep.sum(axis=1) > k, -1] = False
    return idx[keep].reshape(n, k), dist[keep].reshape(n, k)


def _grid(xy: np.ndarray) -> dict:
    """Point counts on a GRID x GRID raster of the map's bounds (padded 2%), rows from low y up."""
    lo, hi = xy.min(axis=0).astype(np.float64), xy.max(axis=0).astype(np.float64)
    pad = np.maximum((hi - lo) * 0.02, 1e-3)
    lo, hi = lo - pad, hi + pad
    counts, _, _ = np.histogram2d(xy[:, 0], xy[:, 1], bins=GRID, range=[[lo[0], hi[0]], [lo[1], hi[1]]])
    return {
        "x": [float(lo[0]), float(hi[0])],
        "y": [float(lo[1]), float(hi[1])],
        "size": GRID,
        "counts": counts.T.astype(int).ravel().tolist(),
    }


def _min_cluster_size(cfg: MapConfig, n: int) -> int:
    return min(n, cfg.min_cluster_size or max(10, n // 400))


def compute_layout(
    rows: np.ndarray,
    cfg: MapConfig,
    work: Path | None = None,
    progress: Progress = _quiet,
    graph: tuple[np.ndarray, np.ndarray] | None = None,
) -> Layout:
    """The map of decoder `rows` [n, d]: positions, clusters, map neighbours and density grid. `graph`, when
    given, is the (neighbour indices, distances) [n, n_neighbors] UMAP lays out instead of the rows' cosine kNN.
    With `work`, the kNN blocks and the layout are kept there and reused by a later call."""
    n = len(rows)
    if n <= cfg.n_neighbors:
        raise SaescopeError(f"a map of {n} features needs more than n_neighbors={cfg.n_neighbors} of them: lower --n-neighbors")
    timings: dict[str, float] = {}
    t = time.perf_counter()
    unit = _unit_rows(rows)
    knn, dist = graph if graph is not None else cosine_knn(unit, cfg.n_neighbors, work, progress)
    timings["neighbours"] = time.perf_counter() - t

    t = time.perf_counter()
    saved = work / f"layout-{cfg.neighbours}-seed{cfg.seed}-nn{cfg.n_neighbors}-md{cfg.min_dist:g}.npy" if work is not None else None
    if saved is not None and saved.exists():
        xy = np.load(saved)
        progress("layout", 1, 1)
    else:
        xy = umap_layout(unit, knn, dist, cfg, progress)
        if saved is not None:
            np.save(saved.with_suffix(".tmp.npy"), xy)
            saved.with_suffix(".tmp.npy").replace(saved)
    timings["layout"] = time.perf_counter() - t

    t = time.perf_counter()
    progress("clusters", 0, 1)
    size = _min_cluster_size(cfg, n)
    clusters = _clusters(xy, size)
    near, near_dist = _map_neighbours(xy)
    grid = _grid(xy)
    progress("clusters", 1, 1)
    timings["clusters"] = time.perf_counter() - t
    return Layout(xy, clusters, near, near_dist, grid, size, timings)


# --- the store ---------------------------------------------------------------------------------------


def _live_run(conn: Connection, sae_name: str) -> tuple[int, int]:
    """(sae id, live run id) of the named SAE, or a SaescopeError that says what to do."""
    row = conn.execute(select(SAE.id, SAE.active_run_id).where(SAE.name == sae_name)).first()
    if row is None:
        names = conn.scalars(select(SAE.name).order_by(SAE.name)).all()
        raise SaescopeError(f"the store has no SAE named {sae_name!r}" + (f"; it has {', '.join(names)}" if names else ""))
    if row.active_run_id is None:
        raise SaescopeError(f"{sae_name} has not been mined yet: run `saescope mine` first (the map places the features that fired)")
    return row.id, row.active_run_id


def _settings(cfg: MapConfig, n: int) -> dict:
    import umap

    return {
        "method": f"umap-learn {umap.__version__}",
        "metric": "cosine" if cfg.neighbours == "decoder" else "coactivation jaccard",
        "knn": "exact" if cfg.neighbours == "decoder" else "mined co-firing partners",
        "n_neighbors": cfg.n_neighbors,
        "min_dist": cfg.min_dist,
        "min_cluster_size": _min_cluster_size(cfg, n),
        "clusters": f"hdbscan leaf, min_samples {HDBSCAN_MIN_SAMPLES}",
    }


def _work_folder(engine: Engine, sae_name: str, run_id: int, unit_digest: str) -> Path:
    """The work folder of this store's run: emptied when the decoder rows it was made from differ."""
    store = hashlib.sha256(engine.url.render_as_string(hide_password=True).encode()).hexdigest()[:10]
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", sae_name)
    work = settings.home() / "maps" / f"{safe}-run{run_id}-{store}"
    stamp = work / "rows.sha256"
    if work.exists() and (not stamp.exists() or stamp.read_text() != unit_digest):
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    stamp.write_text(unit_digest)
    return work


def _decoder_rows(conn: Connection, sae_name: str, indices: Sequence[int]) -> np.ndarray:
    from ..store.weights import load_run_sae

    _, loaded = load_run_sae(conn, sae_name)
    w_dec = loaded.sae.W_dec.detach().float().cpu().numpy()
    return w_dec[np.asarray(indices, dtype=np.int64)]


def coactivation_graph(conn: Connection, run_id: int, alive: Sequence[int], k: int) -> tuple[np.ndarray, np.ndarray]:
    """UMAP's neighbour graph from the co-firing partners mining stored (Feature.coactivation, strongest first):
    each feature itself at distance 0, then its alive partners at 1 - Jaccard; -1 pads a feature with fewer."""
    at = {index: i for i, index in enumerate(alive)}
    knn = np.full((len(alive), k), -1, dtype=np.int64)
    dist = np.full((len(alive), k), np.inf, dtype=np.float32)
    rows = conn.execute(
        select(Feature.index, Feature.coactivation).where(Feature.run_id == run_id, Feature.n_fired > 0).order_by(Feature.index)
    )
    stored = 0
    for index, partners in rows:
        if partners is None:
            raise SaescopeError(
                f"run {run_id} was mined without co-activation (--coactivation 0): map it with --neighbours decoder, or mine again"
            )
        i = at[index]
        knn[i, 0], dist[i, 0] = i, 0.0
        kept = [(at[p[0]], 1.0 - float(p[3])) for p in partners if p[0] in at][: k - 1]
        stored = max(stored, len(partners))
        for j, (q, d) in enumerate(kept, start=1):
            knn[i, j], dist[i, j] = q, d
    if stored + 1 < k:
        raise SaescopeError(
            f"mining kept {stored} co-firing partners per feature; --n-neighbors {k} needs {k - 1}: lower --n-neighbors "
            f"or mine again with --coactivation {k - 1}"
        )
    return knn, dist


def build_map(sae_name: str, cfg: MapConfig, progress: Progress = _quiet) -> MapResult:
    """Compute and store the map of the SAE's live run (see the module's docstring)."""
    t0 = time.perf_counter()
    if cfg.neighbours not in ("decoder", "coactivation"):
        raise SaescopeError(f"--neighbours is decoder or coactivation, not {cfg.neighbours!r}")
    engine = db.open_store(cfg.db)
    try:
        with engine.connect() as conn:
            sae_id, run_id = _live_run(conn, sae_name)
            alive = conn.scalars(select(Feature.index).where(Feature.run_id == run_id, Feature.n_fired > 0).order_by(Feature.index)).all()
            if not alive:
                raise SaescopeError(f"no feature of {sae_name} fired in its mining run: there is nothing to map")
            existing = conn.execute(
                select(FeatureMap.seed, FeatureMap.config, FeatureMap.n_clusters).where(FeatureMap.run_id == run_id)
            ).first()
            wanted = _settings(cfg, len(alive))
            if existing is not None and not cfg.force:
                same = existing.seed == cfg.seed and all(existing.config.get(k) == v for k, v in wanted.items() if k != "method")
                if not same and not cfg.keep_existing:
                    raise SaescopeError(
                        f"run {run_id} of {sae_name} already has a map made with other settings (seed {existing.seed}, "
                        f"{json.dumps({k: existing.config.get(k) for k in ('metric', 'n_neighbors', 'min_dist', 'min_cluster_size')})}): "
                        "add --force to replace it"
                    )
                return MapResult(sae_name, run_id, len(alive), existing.n_clusters, existing.seed, 0.0, True, {})
            rows = _decoder_rows(conn, sae_name, alive)
            graph = coactivation_graph(conn, run_id, alive, cfg.n_neighbors) if cfg.neighbours == "coactivation" else None
        digest = hashlib.sha256(_unit_rows(rows).tobytes()).hexdigest()
        if cfg.force:
            shutil.rmtree(_work_folder(engine, sae_name, run_id, digest))
        work = _work_folder(engine, sae_name, run_id, digest)
        layout = compute_layout(rows, cfg, work, progress, graph)
        seconds = time.perf_counter() - t0
        t = time.perf_counter()
        write_map(engine, sae_id, run_id, alive, layout, cfg, wanted, seconds)
        progress("write", 1, 1)
        shutil.rmtree(work, ignore_errors=True)  # stored: the map is in the store now
        timings = {**layout.timings, "write": time.perf_counter() - t}
        n_clusters = int(layout.clusters.max()) + 1 if len(layout.clusters) else 0
        return MapResult(sae_name, run_id, len(alive), n_clusters, cfg.seed, time.perf_counter() - t0, False, timings)
    finally:
        engine.dispose()


def write_map(
    engine: Engine, sae_id: int, run_id: int, indices: Sequence[int], layout: Layout, cfg: MapConfig, config: dict, seconds: float
) -> None:
    """Replace the run's map with `layout` (its rows are `indices`), in one transaction."""
    index = np.asarray(indices, dtype=np.int64)
    n_clusters = int(layout.clusters.max()) + 1 if len(layout.clusters) else 0

    def rows() -> Iterator[tuple[int, int, float, float, int, str]]:
        for i in range(len(index)):
            near = [[int(index[j]), round(float(d), 4)] for j, d in zip(layout.neighbours[i], layout.distances[i])]
            yield (
                run_id,
                int(index[i]),
                float(layout.xy[i, 0]),
                float(layout.xy[i, 1]),
                int(layout.clusters[i]),
                orjson.dumps(near).decode(),
            )

    with Session(engine) as s, s.begin():
        s.execute(delete(FeatureMapPoint).where(FeatureMapPoint.run_id == run_id))
        s.execute(delete(FeatureMap).where(FeatureMap.run_id == run_id))
        s.execute(
            insert(FeatureMap).values(
                run_id=run_id, seed=cfg.seed, n_points=len(index), n_clusters=n_clusters, config=config, seconds=seconds, grid=layout.grid
            )
        )
        load_rows(s, FeatureMapPoint, ("run_id", "feature_index", "x", "y", "cluster", "neighbours"), rows(), total=len(index))
        mark_changed(s, sae_id)


# --- readers (the map page, the feature page's inset, the API) -----------------------------------------


def map_info(conn: Connection, run_id: int) -> Row | None:
    """The run's feature_maps row (seed, n_points, n_clusters, config, grid, created_at), or None."""
    return conn.execute(select(FeatureMap).where(FeatureMap.run_id == run_id)).first()


def map_points(conn: Connection, run_id: int, offset: int = 0, limit: int | None = None) -> list[Row]:
    """(index, x, y, cluster) of the run's points in feature order, a page of them with offset and limit."""
    q = select(FeatureMapPoint.index, FeatureMapPoint.x, FeatureMapPoint.y, FeatureMapPoint.cluster)
    q = q.where(FeatureMapPoint.run_id == run_id).order_by(FeatureMapPoint.index).offset(offset)
    return list(conn.execute(q if limit is None else q.limit(limit)).all())


def map_point(conn: Connection, run_id: int, index: int) -> Row | None:
    """(x, y, cluster, neighbours) of one feature, or None when it is not on the map (dead, or no map)."""
    q = select(FeatureMapPoint.x, FeatureMapPoint.y, FeatureMapPoint.cluster, FeatureMapPoint.neighbours)
    return conn.execute(q.where(FeatureMapPoint.run_id == run_id, FeatureMapPoint.index == index)).first()
