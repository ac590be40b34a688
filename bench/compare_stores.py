"""Do two stores hold the same mining results? The check behind "a refactor changes no stored result".

    python bench/compare_stores.py sqlite:///a.db sqlite:///b.db [--sae NAME]

Compares, for every SAE (or one), what readers see of its live run: the SAE row (less its folder
path), the run's corpus, token count and config, every feature row, every example row (token ids and
activation blobs byte for byte) and the search index, plus the model rows and the vocabulary. Ids,
timestamps and paths differ between two runs by design and are left out. Prints one line per table and
exits 1 on any difference.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sqlalchemy import create_engine, text

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

QUERIES = {
    "models": "SELECT name, d_model, n_layers, vocab_size FROM models ORDER BY name",
    "vocab": "SELECT m.name, v.token_id, v.text FROM vocab v JOIN models m ON m.id = v.model_id ORDER BY 1, 2",
    "saes": "SELECT s.name, s.hook, s.architecture, s.d_in, s.n_latents, s.k, s.train_config, s.metrics FROM saes s WHERE {sae} ORDER BY 1",
    "runs": "SELECT s.name, r.corpus, r.tokens, r.config FROM saes s JOIN mining_runs r ON r.id = s.active_run_id WHERE {sae} ORDER BY 1",
    "features": "SELECT s.name, f.* FROM saes s JOIN features f ON f.run_id = s.active_run_id WHERE {sae} ORDER BY 1, f.feature_index",
    "examples": "SELECT s.name, e.feature_index, e.kind, e.interval, e.rank, e.doc_id, e.doc_offset, e.token_ids, e.acts, e.max_act, "
    "e.max_pos FROM saes s JOIN examples e ON e.run_id = s.active_run_id WHERE {sae} ORDER BY 1, 2, 3, 4, 5",
    "token_features": "SELECT s.name, t.token_id, t.feature_index, t.n_examples, t.max_act FROM saes s "
    "JOIN token_features t ON t.run_id = s.active_run_id WHERE {sae} ORDER BY 1, 2, 3",
}
DROP = {"features": {"id", "run_id"}}


def rows(url: str, table: str, sae: str | None) -> list[tuple]:
    engine = create_engine(url)
    with engine.connect() as conn:
        where = "s.name = :sae" if sae else "1 = 1"
        result = conn.execute(text(QUERIES[table].format(sae=where)), {"sae": sae} if sae else {})
        keep = [i for i, k in enumerate(result.keys()) if k not in DROP.get(table, set())]
        out = [tuple(repr(r[i]) for i in keep) for r in result]
    engine.dispose()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--sae", default=None, help="compare one SAE (default: all)")
    args = ap.parse_args()
    different = False
    for table in QUERIES:
        a, b = rows(args.a, table, args.sae), rows(args.b, table, args.sae)
        same = a == b
        first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        print(f"{table:15s} {len(a):>9,} vs {len(b):>9,} rows: " + ("identical" if same else f"DIFFERENT (first at row {first})"))
        if not same and first is not None:
            print(f"    a: {a[first][:6]}\n    b: {b[first][:6]}")
        different |= not same
    return 1 if different else 0


if __name__ == "__main__":
    sys.exit(main())
