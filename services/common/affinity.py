"""Which CPU cores a process, or one thread of it, runs on (Linux affinity)."""

from __future__ import annotations

import os


def available() -> list[int]:
    """The cores this process may run on."""
    return sorted(os.sched_getaffinity(0))


def parse(spec: str) -> list[int]:
    """'0', '0,2', '1-3' -> core ids; ValueError on anything else."""
    out: list[int] = []
    for part in spec.split(","):
        lo, dash, hi = part.strip().partition("-")
        hi = hi if dash else lo
        if not (lo.isdigit() and hi.isdigit()) or int(hi) < int(lo):
            raise ValueError(f"{spec!r} is not a list of cores like 0, 0,2 or 1-3")
        out += range(int(lo), int(hi) + 1)
    return out


def pin_thread(cpus: list[int]) -> None:
    """The calling thread only; the threads it starts later (torch's OpenMP team) inherit it."""
    os.sched_setaffinity(0, cpus)  # Linux: 0 is the calling thread, not the whole process


def pin_process(cpus: list[int]) -> None:
    """Every thread of this process (threads started later inherit it)."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except ProcessLookupError:
            pass  # a thread that just ended
