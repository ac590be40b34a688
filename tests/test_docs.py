"""The docs match the code: the CLI reference is what the CLI generates, and every doc link resolves."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_cli_reference_is_current(tmp_path):
    out = tmp_path / "cli.md"
    typer_bin = Path(sys.executable).parent / "typer"
    subprocess.run([str(typer_bin), "saescope.cli", "utils", "docs", "--name", "saescope", "--output", str(out)],
                   check=True, capture_output=True, cwd=ROOT)
    committed = (ROOT / "docs" / "cli.md").read_text().split("\n", 2)[2]   # after the "generated" header
    assert committed == out.read_text(), "docs/cli.md is stale: run `make docs`"


def test_doc_links_resolve():
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#:]+\.md)\)", doc.read_text()):
            assert (doc.parent / target).exists(), f"{doc.name} links to missing {target}"


def test_every_cli_command_is_documented():
    from typer.main import get_command

    from saescope.cli import app

    reference = (ROOT / "docs" / "cli.md").read_text()
    for name in get_command(app).commands:
        assert f"## `saescope {name}" in reference, name


def test_configuration_reference_is_current():
    from sae_core.config import BEGIN, END, reference

    text = (ROOT / "docs" / "configuration.md").read_text()
    assert BEGIN in text and END in text, "docs/configuration.md lost its generated section: run `make docs`"
    assert BEGIN + text.split(BEGIN, 1)[1].split(END, 1)[0] + END == reference(), "docs/configuration.md is stale: run `make docs`"
