"""A service `pdserve up` started ends with it, even when the launcher is SIGKILLed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from pdserve.common.launcher_bond import LAUNCHER_PID_ENV, follow_launcher
from tests.polling import eventually

# A launcher stand-in: starts one "service" in a process group of its own, as the Suite does.
_LAUNCHER = """
import os, subprocess, sys, time
service = subprocess.Popen(
    [sys.executable, "-c", SERVICE],
    env={**os.environ, "ENV": str(os.getpid())},
    stdout=subprocess.PIPE, text=True, process_group=0,
)
print(service.pid, service.stdout.readline().strip(), flush=True)
time.sleep(60)
"""
_SERVICE = """
import time
from pdserve.common.launcher_bond import follow_launcher
print("followed" if follow_launcher() else "not followed", flush=True)
time.sleep(60)
"""


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] in "ZX"  # ended, not yet reaped
    except (OSError, IndexError):
        return True


def test_a_service_ends_when_its_launcher_is_killed():
    launcher = subprocess.Popen(
        [sys.executable, "-c", _LAUNCHER.replace("SERVICE", repr(_SERVICE)).replace('"ENV"', repr(LAUNCHER_PID_ENV))],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        pid, said = launcher.stdout.readline().split()
        assert said == "followed"
        assert not _gone(int(pid))
        launcher.kill()  # SIGKILL: no handler of the launcher's runs
        launcher.wait()
        assert eventually(lambda: _gone(int(pid)), 10)
    finally:
        launcher.kill()
        if "pid" in locals() and not _gone(int(pid)):
            os.kill(int(pid), signal.SIGKILL)


def test_a_process_no_launcher_started_is_left_alone():
    assert not follow_launcher({})
    assert not follow_launcher({LAUNCHER_PID_ENV: "not-a-pid"})
