"""The state file of `pdserve up`: read only while the launcher that wrote it lives."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from pdserve.launcher import run_state


def _state_of(path, pid: int, started: int | None) -> dict | None:
    path.write_text(json.dumps({"launcher_pid": pid, "launcher_started": started, "services": []}))
    return run_state.read(path)


def test_a_state_file_names_its_launcher_by_pid_and_start_time(tmp_path):
    path = tmp_path / "up-50051.json"
    me = os.getpid()
    assert _state_of(path, me, run_state.started(me)) is not None
    # A SIGKILLed launcher's file, its pid now another live process's (here: ours, started earlier).
    assert _state_of(path, me, run_state.started(me) + 1) is None
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    assert _state_of(path, int(gone.stdout), None) is None  # its launcher is gone
    assert run_state.read(tmp_path / "none.json") is None
