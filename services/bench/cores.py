"""Which CPU cores each benchmark process runs on, and the CPU time it used.

A child is pinned by a tiny stub that sets its own affinity and execs the real command, so its pid (what the
launcher signals) stays the same, and torch/OpenMP size their thread pools to the cores it was given.
"""

from __future__ import annotations

import os
import sys
import time

_PIN = (
    "import os, sys; os.sched_setaffinity(0, {int(c) for c in sys.argv[1].split(',')}); "
    "os.execv(sys.argv[2], sys.argv[2:])"
)


def pinned(argv: tuple[str, ...], cpus: list[int] | None, python: str = sys.executable) -> tuple[str, ...]:
    """`argv` run on `cpus` only (None: unchanged). argv[0] must be a path (sys.executable is)."""
    if not cpus:
        return argv
    return (python, "-c", _PIN, ",".join(map(str, cpus)), *argv)


def halves(cpus: list[int]) -> tuple[list[int], list[int]]:
    """Two disjoint sets (first half, second half); needs two cores at least."""
    if len(cpus) < 2:
        raise ValueError(f"pinning two roles to disjoint cores needs 2 cores; this process may use {cpus}")
    mid = len(cpus) // 2
    return cpus[:mid], cpus[mid:]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU time each process used between start() and per_request_ms()."""

    def __init__(self, pids: dict[str, int]):
        self.pids = pids

    def _now(self) -> dict[str, float]:
        return {**{n: cpu_seconds(p) for n, p in self.pids.items()}, "client": time.process_time()}

    def start(self) -> None:
        self._t0 = self._now()

    def per_request_ms(self, n: int) -> dict[str, float]:
        t1 = self._now()
        return {k: (t1[k] - self._t0[k]) * 1e3 / max(n, 1) for k in t1}
