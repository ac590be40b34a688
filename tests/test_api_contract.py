"""The API keeps the contract it publishes: schemathesis, with all its checks, against a live server
over a really mined store, on SQLite and on PostgreSQL. Every status an endpoint returns must be in
the OpenAPI document with the body it really sends; 405 must carry Allow; invalid input must be
refused and valid input accepted: the live endpoints too, with no exception for them, since the document
states this server's caps (max_new_tokens, interventions) and a text past a token cap is cut, not refused."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path


from app.main import create_app
from sae_core.config import LiveConfig
from conftest import LiveServer, mine_tiny

ST = Path(sys.executable).parent / "st"     # schemathesis' command line, installed by the test extra
# Caps below the defaults, so that the generator's schema-valid values reach past what a server with the
# default caps would take (max_new_tokens up to 64 here, 256 by default).
LIVE = LiveConfig(live_device="cpu", live_model_dtype="float32", live_threads=1, live_nice=0, live_queue=8,
                  max_text_tokens=48, max_prompt_tokens=16, max_new_tokens_limit=64, max_interventions=3)


def wait_ready(base: str, timeout: float = 120) -> None:
    import json
    import time
    import urllib.request

    deadline = time.time() + timeout
    while json.loads(urllib.request.urlopen(f"{base}/api/v1/live").read())["state"] != "ready":
        assert time.time() < deadline, "the model process did not come up"
        time.sleep(0.3)


# The steering body names its SAE in a field, which schemathesis' [parameters] cannot pin: a hook does.
PIN_STEER_SAE = """
import schemathesis


@schemathesis.hook
def map_body(context, body):
    if context.operation.path == "/api/v1/steer" and isinstance(body, dict) and "sae" in body:
        body["sae"] = "tiny-sae"
    return body
"""


def schemathesis(base: str, tmp_path: Path, *options: str, config: str = "", hooks: str = "") -> None:
    import os

    (tmp_path / "schemathesis.toml").write_text(config)
    (tmp_path / "contract_hooks.py").write_text(hooks)
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "contract_hooks", "PYTHONPATH": str(tmp_path)}
    proc = subprocess.run([str(ST), "--config-file", str(tmp_path / "schemathesis.toml"), "run", f"{base}/openapi.json",
                           "--max-examples", "40", "--workers", "1", "--seed", "1", "--no-color", *options],
                          capture_output=True, text=True, timeout=900, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    counts = re.search(r"(\d+) generated, (\d+) passed", proc.stdout)
    assert counts and counts[1] == counts[2] and int(counts[1]) > 100, proc.stdout[-3000:]


def run_schemathesis(url: str, tmp_path: Path) -> None:
    # with its model process, so the live endpoints answer too (a server without one answers them 503)
    live = LiveServer(create_app(url, live_config=LIVE))
    try:
        wait_ready(live.url)
        schemathesis(live.url, tmp_path, "--checks", "all")
        # Again with the SAE name pinned (in the path, and in the steering body), so the generated requests
        # reach real features and the model, and their bodies are checked against the schema, not only the
        # 404s a random name gets: every schema-valid request must be answered (positive_data_acceptance,
        # no exception for the live endpoints). A pinned name replaces the generator's invalid ones, so the
        # invalid-input check belongs to the first run.
        schemathesis(live.url, tmp_path, "--checks", "all", "--exclude-checks", "negative_data_rejection",
                     config='[parameters]\n"path.sae" = "tiny-sae"\n', hooks=PIN_STEER_SAE)
    finally:
        live.stop()


def test_contract_on_sqlite(mined_store, tmp_path):
    run_schemathesis(mined_store, tmp_path)


def test_contract_on_postgres(tiny_sae_dir, tiny_lm, pg_url, tmp_path):
    mine_tiny(tiny_sae_dir, tiny_lm, pg_url)
    run_schemathesis(pg_url, tmp_path)
