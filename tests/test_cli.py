"""Every CLI command driven the way the README does: the installed `saescope` entry point in a fresh
process, `--help` plus one real call each, on the tiny in-process model (the demo's real call is in
test_e2e.py). `serve` really listens on a port, answers pages and the API, and stops on Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

SAESCOPE = str(Path(sys.executable).parent / "saescope")
COMMANDS = ["cache", "train", "eval", "import", "mine", "serve", "demo", "db", "db upgrade", "db status", "fetch-corpus"]


def saescope(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([SAESCOPE, *args], capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})


@pytest.mark.parametrize("command", COMMANDS)
def test_help(command):
    r = saescope(*command.split(), "--help")
    assert r.returncode == 0 and "Usage: saescope" in r.stdout, r.stderr


def help_sources(typer_app, path: tuple[str, ...] = ()):
    """(command path, help texts as written in the source) for every command and sub-group of the CLI:
    the group's help, each command's docstring or help=, and each option's and argument's help."""
    import inspect

    yield path, [typer_app.info.help or ""]
    for info in typer_app.registered_commands:
        name = info.name or info.callback.__name__.replace("_", "-")
        texts = [info.help or inspect.getdoc(info.callback) or ""]
        texts += [getattr(p.default, "help", None) or "" for p in inspect.signature(info.callback).parameters.values()]
        yield (*path, name), texts
    for group in typer_app.registered_groups:
        yield from help_sources(group.typer_instance, (*path, group.name))


def test_no_help_text_loses_bracketed_words():
    """Rich reads "[batch, context, vocab]" as markup; every bracketed phrase of every help text must be printed."""
    import re

    from typer.testing import CliRunner

    from saescope.cli import app

    runner, checked = CliRunner(), 0
    for path, texts in help_sources(app):
        r = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "2000"})  # wide: no phrase split across lines
        assert r.exit_code == 0, (path, r.output)
        printed = " ".join(re.sub(r"[│╭╮╰╯─]", " ", r.output).split())
        for phrase in (p for text in texts for p in re.findall(r"\[[^\[\]]+\]", " ".join(text.split()))):
            assert phrase in printed, f"`saescope {' '.join(path)} --help` lost {phrase!r}"
            checked += 1
    assert checked >= 2  # eval's [batch, context, vocab] and mine's [0, max] at least


def test_bad_input_is_one_clear_line():
    r = saescope("mine", "--sae", "/no/such/sae", "--db", "sqlite:////tmp/unused.db")
    assert r.returncode == 2 and "error:" in r.stderr and "Traceback" not in r.stderr
    r = saescope("serve", "--port", "0")
    assert r.returncode == 2 and "--port must be between 1 and 65535" in r.stderr
    # a message holding rich markup (Gloo's errors name "[/path/pair.cc:553]") is printed as it is
    r = saescope("mine", "--sae", "/no/such/[/sae]", "--db", "sqlite:////tmp/unused.db")
    assert r.returncode == 2 and "[/sae]" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_pipeline_commands(tiny_model, tiny_corpus, tmp_path):
    cache, sae, url = tmp_path / "cache", tmp_path / "sae", f"sqlite:///{tmp_path / 'store.db'}"
    common = ["--device", "cpu"]
    r = saescope("cache", "--out", str(cache), "--model", str(tiny_model), "--corpus", str(tiny_corpus), "--hook",
                 "blocks.1.hook_resid_post", "--context-size", "32", "--tokens", "2048", "--batch-size", "8",
                 "--windows-per-shard", "16", "--dtype", "float32", "--model-dtype", "float32", *common)
    assert r.returncode == 0 and "cache ready" in r.stderr, r.stderr
    r = saescope("train", "--activations", str(cache), "--out", str(sae), "--n-latents", "64", "--k", "4",
                 "--batch-size", "128", "--tokens", "4096", *common)
    assert r.returncode == 0 and "trained" in r.stderr and (sae / "cfg.json").exists(), r.stderr
    r = saescope("eval", "--sae", str(sae), "--tokens", "512", "--model-dtype", "float32", *common)
    assert r.returncode == 0 and "ce_score" in r.stdout, r.stderr
    assert json.loads((sae / "eval.json").read_text())["tokens"] > 0
    r = saescope("import", str(sae), "--out", str(tmp_path / "imported"))
    assert r.returncode == 0 and (tmp_path / "imported" / "sae_weights.safetensors").exists(), r.stderr
    r = saescope("db", "upgrade", "--db", url)
    assert r.returncode == 0 and "schema empty ->" in r.stderr, r.stderr
    r = saescope("mine", "--sae", str(sae), "--db", url, "--tokens", "1024", "--batch-size", "8", "--windows-per-chunk", "16",
                 "--top-n", "4", "--model-dtype", "float32", *common)
    assert r.returncode == 0 and "is live" in r.stderr, r.stderr
    r = saescope("db", "status", "--db", url)
    assert r.returncode == 0 and "run `saescope db upgrade`" not in r.stderr, r.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.status, r.read().decode()


def serve_then_interrupt(args: list[str], port: int, feature_path: str, timeout: float = 120) -> str:
    """Start `saescope <args>`, wait until it answers, check pages and API, then Ctrl-C it; its stderr."""
    proc = subprocess.Popen([SAESCOPE, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout
        while True:
            try:
                status, home = get(base + "/")
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise AssertionError(f"the server did not come up: {proc.communicate(timeout=10)[1][-3000:]}")
                time.sleep(0.3)
        assert status == 200 and "saescope" in home
        status, page = get(base + feature_path)
        assert status == 200 and '<svg class="hist"' in page
        sae = feature_path.split("/")[2]
        status, body = get(f"{base}/api/v1/saes/{sae}")
        assert status == 200 and json.loads(body)["name"] == sae
    finally:
        proc.send_signal(signal.SIGINT)          # what Ctrl-C sends
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "Traceback" not in err, err[-3000:]
    return err


@pytest.mark.parametrize("workers", ["1", "2"])
def test_serve_answers_and_stops_on_ctrl_c(mined_store, workers):
    port = free_port()
    serve_then_interrupt(["serve", "--db", mined_store, "--port", str(port), "--workers", workers], port, "/saes/tiny-sae/features/3")


@pytest.mark.real_model
def test_fetch_corpus_and_demo_entry(tmp_path):
    """`fetch-corpus` for real (over the shared download, which test_e2e's demo makes from nothing);
    the demo's whole real call, serving included, is test_e2e.py."""
    import sae_core.settings

    shared = sae_core.settings.corpus_dir()            # conftest points it at the shared download
    from sae_core.corpus import fetch_demo

    fetch_demo(shared)
    home = tmp_path / "home"
    home.mkdir()
    (home / "corpus").symlink_to(shared)
    r = saescope("fetch-corpus", env={"SAESCOPE_HOME": str(home)})
    assert r.returncode == 0 and f"demo corpus in {home / 'corpus'}" in r.stderr.replace("\n", ""), r.stderr
