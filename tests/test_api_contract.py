"""The API keeps the contract it publishes: schemathesis, with all its checks, against a live server
over a really mined store, on SQLite and on PostgreSQL. Every status an endpoint returns must be in
the OpenAPI document with the body it really sends; 405 must carry Allow; invalid input must be
refused and valid input accepted."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path


from app.main import create_app
from sae_core.config import LiveConfig
from conftest import LiveServer, mine_tiny

ST = Path(sys.executable).parent / "st"     # schemathesis' command line, installed by the test extra
LIVE = LiveConfig(live_device="cpu", live_model_dtype="float32", live_threads=1, live_nice=0, live_queue=8)
# The live endpoints' limits are in tokens and set per server (LiveConfig), which a JSON schema cannot state:
# a schema-valid text can be over them (422 with the reason), and a feature index past the SAE's width is a 404.
LIVE_LIMITS = '[[operations]]\ninclude-tag = "live"\nchecks.positive_data_acceptance.expected-statuses = [200, 404, 422]\n'


def wait_ready(base: str, timeout: float = 120) -> None:
    import json
    import time
    import urllib.request

    deadline = time.time() + timeout
    while json.loads(urllib.request.urlopen(f"{base}/api/v1/live").read())["state"] != "ready":
        assert time.time() < deadline, "the model process did not come up"
        time.sleep(0.3)


def schemathesis(base: str, tmp_path: Path, *options: str, config: str = "") -> None:
    (tmp_path / "schemathesis.toml").write_text(config)
    proc = subprocess.run([str(ST), "--config-file", str(tmp_path / "schemathesis.toml"), "run", f"{base}/openapi.json",
                           "--max-examples", "40", "--workers", "1", "--seed", "1", "--no-color", *options],
                          capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    counts = re.search(r"(\d+) generated, (\d+) passed", proc.stdout)
    assert counts and counts[1] == counts[2] and int(counts[1]) > 100, proc.stdout[-3000:]


def run_schemathesis(url: str, tmp_path: Path) -> None:
    # with its model process, so the live endpoints answer too (a server without one answers them 503)
    live = LiveServer(create_app(url, live_config=LIVE))
    try:
        wait_ready(live.url)
        schemathesis(live.url, tmp_path, "--checks", "all")
        # Again with the SAE name pinned, so the generated requests reach real features and their
        # bodies are checked against the schema, not only the 404s a random name gets. A pinned name
        # replaces the generator's invalid ones, so the invalid-input check belongs to the first run.
        schemathesis(live.url, tmp_path, "--checks", "all", "--exclude-checks", "negative_data_rejection",
                     config='[parameters]\n"path.sae" = "tiny-sae"\n' + LIVE_LIMITS)
    finally:
        live.stop()


def test_contract_on_sqlite(mined_store, tmp_path):
    run_schemathesis(mined_store, tmp_path)


def test_contract_on_postgres(tiny_sae_dir, tiny_lm, pg_url, tmp_path):
    mine_tiny(tiny_sae_dir, tiny_lm, pg_url)
    run_schemathesis(pg_url, tmp_path)
