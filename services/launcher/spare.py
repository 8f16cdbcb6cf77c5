"""A warm spare: a worker process started before it is needed, for a crashed worker to restart in.

The launcher's side (the process's is spare_process.py). A worker's start is mostly imports (torch
and transformers: ~5 of its ~9 s on 2 Zen 3 cores, more beside busy workers), and the self-healing
objective brings a killed worker back within 15 s. The spare has done them: it waits for the
command line of the worker it is to become, one line of JSON on its stdin, and runs it. Only
crashes use it: a rolling restart, often of new code, starts fresh.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pdserve
from pdserve.common.launcher_bond import LAUNCHER_PID_ENV

ENTRY = "import sys; from pdserve.launcher.spare_process import main; sys.exit(main())"


class Spare:
    """The launcher's side: one spare process at a time, started while the suite is quiet."""

    GIVE_UP_AFTER = 3  # spares that died by themselves (an import failing): then restarts start afresh

    def __init__(self, python: str, env: dict[str, str]) -> None:
        self.python = python
        self.env = {**env, LAUNCHER_PID_ENV: str(os.getpid())}
        self.proc: subprocess.Popen | None = None
        self.stamp = 0  # the code's when the spare started (code_stamp)
        self.deaths = 0

    def _running(self) -> bool:
        """Whether a spare runs; one that died by itself is forgotten and counted toward giving up."""
        if self.proc is not None and self.proc.poll() is not None:
            self.proc, self.deaths = None, self.deaths + 1
        return self.proc is not None

    def needed(self) -> bool:
        """No spare running, and spares have not kept dying: one should be started."""
        return not self._running() and self.deaths < self.GIVE_UP_AFTER

    def start(self) -> subprocess.Popen:
        self.stamp = code_stamp()
        try:
            self.proc = subprocess.Popen(
                [self.python, "-c", ENTRY],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=self.env,
                process_group=0,  # as a service's: a terminal's Ctrl-C reaches only the launcher
            )
        except OSError:  # out of processes or memory: the suite serves on without a spare
            self.deaths += 1
            raise
        return self.proc

    def claim(self, argv: tuple[str, ...]) -> subprocess.Popen | None:
        """The spare, no longer one, to become the worker `argv` runs (a `python -m pdserve` command line
        of the same python); None if there is none or it cannot: then the spare is kept, or dropped if
        the code changed on disk since it imported (an upgrade: a worker must not mix old and new)."""
        if tuple(argv[:3]) != (self.python, "-m", "pdserve") or not self._running():
            return None
        if code_stamp() != self.stamp:
            self.stop()
            return None
        proc, self.proc = self.proc, None
        return proc

    def hand_over(self, proc: subprocess.Popen, argv: tuple[str, ...], env: dict[str, str]) -> bool:
        """Tell a claimed spare to run `argv` with `env` added; False if it died meanwhile."""
        try:
            proc.stdin.write((json.dumps({"argv": list(argv[3:]), "env": env}) + "\n").encode())
            proc.stdin.flush()
        except OSError:
            return False
        self.deaths = 0  # spares start and take over here
        return True

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()  # idle, or still importing: nothing to drain
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def code_stamp() -> int:
    """The newest modification time of pdserve's Python files: another after an upgrade in place."""
    root = Path(pdserve.__file__).parent
    return max((p.stat().st_mtime_ns for p in root.rglob("*.py")), default=0)
