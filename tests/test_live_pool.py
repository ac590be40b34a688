"""The model process never outlives its server, even one killed while the model process still starts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

PARENT = """
import sys
from sae_core.config import LiveConfig
from sae_core.live.pool import ModelPool
pool = ModelPool(sys.argv[1], LiveConfig()).start()
print(pool.process.pid, flush=True)
sys.stdin.read()
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie waiting for its (gone) parent's reaper counts as gone
        return f.read().split(")")[-1].split()[0] != "Z"


def test_model_process_exits_when_its_server_is_killed_during_start(tmp_path):
    server = subprocess.Popen([sys.executable, "-c", PARENT, f"sqlite:///{tmp_path / 'store.db'}"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    child = int(server.stdout.readline())
    server.send_signal(signal.SIGKILL)  # no chance to stop its model process; it is still importing torch
    server.wait()
    deadline = time.monotonic() + 30
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(child)
