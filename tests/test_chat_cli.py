"""`saescope chat`: one chat turn through the chat template from the terminal, the default and the steered
reply streamed as they are generated; the same text as the runtime's non-streamed answer."""

from __future__ import annotations

from typer.testing import CliRunner

from saescope.cli import app


def test_chat_prints_the_default_and_the_steered_reply(mined_store):
    args = ["chat", "Say something.", "--sae", "tiny-sae", "--db", mined_store, "--feature", "3:clamp:50",
            "--max-new-tokens", "6", "--live-device", "cpu", "--live-model-dtype", "float32"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "default" in lines and "steered  3:clamp:50" in lines
    assert lines.index("default") < lines.index("steered  3:clamp:50")


def test_chat_with_an_unknown_sae_is_one_clear_error(mined_store):
    """The error the CLI's main prints as one line (SaescopeError; CliRunner hands it back unprinted)."""
    from sae_core.errors import SaescopeError

    result = CliRunner().invoke(app, ["chat", "Hi.", "--sae", "nope", "--db", mined_store, "--live-device", "cpu"])
    assert result.exit_code != 0 and isinstance(result.exception, SaescopeError) and "'nope'" in str(result.exception)
