"""`saescope steer` and `saescope sweep` from the command line, over a copy of the tiny mined store: a
conditional intervention and --frozen-attention print what the runtime answers for the same request, a
condition that never holds leaves the steered text the default one, and a sweep prints its table, is
stored, and the second time is read from the store (its permalink then opens the stored result)."""

from __future__ import annotations

import sqlite3

import pytest
from typer.testing import CliRunner

from sae_core.config import GenerationConfig, LiveConfig
from sae_core.live.interventions import Intervention
from sae_core.live.runtime import LiveRuntime
from sae_core.live.sweep import SweepRequest, sweep_permalink
from sae_core.store import db
from saescope.cli import app

MODEL = ["--live-device", "cpu", "--live-model-dtype", "float32"]
PROMPT = "the cat sat over the"


@pytest.fixture(scope="module")
def store(mined_store, tmp_path_factory) -> str:
    copy = tmp_path_factory.mktemp("cli-store") / "store.db"
    with sqlite3.connect(mined_store.removeprefix("sqlite:///")) as src, sqlite3.connect(copy) as dst:
        src.backup(dst)  # the sweep writes a row: not into the store the other modules share
    return f"sqlite:///{copy}"


@pytest.fixture(scope="module")
def runtime(store, tiny_lm):
    return LiveRuntime(LiveConfig(), engine=db.open_store(store), lm=tiny_lm)


def _steer(store: str, *args: str) -> str:
    result = CliRunner().invoke(app, ["steer", PROMPT, "--sae", "tiny-sae", "--db", store, "--max-new-tokens", "8", *MODEL, *args])
    assert result.exit_code == 0, result.output
    return result.output


def test_steer_with_a_condition_and_frozen_attention_prints_the_runtimes_answer(store, runtime):
    out = _steer(store, "--feature", "3:add:60@gen", "--frozen-attention")
    expected = runtime.generate("tiny-sae", PROMPT, [Intervention.parse("3:add:60@gen")], GenerationConfig(8), frozen_attention=True)
    assert expected.frozen is not None and expected.steered.token_ids != expected.default.token_ids  # the push shows
    lines = out.splitlines()
    assert "steered  3:add:60@gen (length)" in lines and "steered, frozen attention  (length)" in lines, out
    assert PROMPT + expected.default.text in out and PROMPT + expected.steered.text in out and PROMPT + expected.frozen.text in out


def test_steer_with_a_condition_that_never_holds_changes_nothing(store, runtime):
    out = _steer(store, "--feature", "3:add:60@3>100000")
    default = PROMPT + runtime.generate("tiny-sae", PROMPT, [], GenerationConfig(8)).default.text
    # the console's headings and print()'s texts reach CliRunner's output in their own order: count the texts
    assert out.count(f"{default}\n") == 2 and "steered  3:add:60@3>100000 (length)" in out and "diverge" not in out, out


def test_sweep_prints_its_table_is_stored_and_is_read_back(store):
    args = ["sweep", "--sae", "tiny-sae", "--db", store, "--feature", "3:add:1@gen", "--strength", "10", "--strength", "40",
            "--prompt", "the cat sat", "--prompt", "then the king said", "--no-heldout", "--new-tokens", "6", *MODEL]  # fmt: skip
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    rows = [line.split() for line in first.output.splitlines() if line.split() and line.split()[0] in ("unsteered", "10", "40")]
    assert [r[0] for r in rows] == ["unsteered", "10", "40"] and all(len(r) >= 4 for r in rows), first.output
    request = SweepRequest("tiny-sae", Intervention.parse("3:add:1@gen"), (10.0, 40.0), ("the cat sat", "then the king said"), (), max_new_tokens=6)
    assert f"permalink: {sweep_permalink(request)}" in first.output and "no_heldout=1" in first.output
    assert "stored: computed" in first.output, first.output
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0 and "read from the store" in again.output, again.output
    numbers = lambda out: [line for line in out.splitlines() if line.split() and line.split()[0] in ("unsteered", "10", "40")]  # noqa: E731
    assert numbers(again.output) == numbers(first.output)
    with db.open_store(store).connect() as conn:
        from sae_core.store.sweeps import find_sweep

        assert find_sweep(conn, request.key()) is not None
