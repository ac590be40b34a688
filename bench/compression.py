"""What compression buys on real responses, and what it costs: gzip levels against brotli qualities.

    pip install brotli   # optional: without it only gzip is measured
    python bench/compression.py [--db URL] [--pages 20]

Renders --pages random feature pages and examples answers of the demo's store (the default data
directory's; `saescope demo --no-serve` makes it) in-process, uncompressed, then compresses each
body with zlib (gzip levels 1, 6: what the server uses, 9) and, when the `brotli` package is
installed, brotli qualities 1, 4, 5, 6 and 11. Prints mean compressed bytes and CPU ms per body.
The server compresses a cached response once and a cold one on every request, so both columns
matter.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def bodies(url: str | None, n: int) -> dict[str, list[bytes]]:
    os.environ["SAESCOPE_RESPONSE_CACHE_MB"] = "0"
    from fastapi.testclient import TestClient
    from sqlalchemy import text

    from app.main import create_app
    from sae_core.store import db

    engine = db.make_engine(url)
    with engine.connect() as conn:
        sae, n_latents = conn.execute(text("SELECT name, n_latents FROM saes WHERE active_run_id IS NOT NULL ORDER BY id LIMIT 1")).one()
    rng = random.Random(0)
    plain = {"accept-encoding": "identity"}
    with TestClient(create_app(url)) as c:
        return {
            "feature page": [c.get(f"/saes/{sae}/features/{rng.randrange(n_latents)}", headers=plain).content for _ in range(n)],
            "examples API": [c.get(f"/api/v1/saes/{sae}/features/{rng.randrange(n_latents)}/examples?limit=20", headers=plain).content for _ in range(n)],
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--db", default=None)
    ap.add_argument("--pages", type=int, default=20)
    args = ap.parse_args()
    codecs = [(f"gzip {lvl}", lambda b, lvl=lvl: zlib.compress(b, lvl)) for lvl in (1, 6, 9)]
    try:
        import brotli

        codecs += [(f"brotli {q}", lambda b, q=q: brotli.compress(b, quality=q)) for q in (1, 4, 5, 6, 11)]
    except ImportError:
        print("(brotli not installed: gzip only)")
    print("| response | codec | bytes | CPU ms per body |\n|---|---|---|---|")
    for name, bs in bodies(args.db, args.pages).items():
        print(f"| {name} | none | {sum(map(len, bs)) / len(bs):,.0f} | |")
        for codec, fn in codecs:
            t0 = time.process_time()
            out = [fn(b) for b in bs]
            cpu = (time.process_time() - t0) / len(bs)
            print(f"| {name} | {codec} | {sum(map(len, out)) / len(out):,.0f} | {cpu * 1000:.2f} |", flush=True)


if __name__ == "__main__":
    main()
