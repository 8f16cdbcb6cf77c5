"""This CPU's /proc/cpuinfo flags, for tests that depend on the ISA."""

from __future__ import annotations

import functools


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The flags of the first CPU listed; empty without /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            return frozenset(next(line for line in f if line.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        return frozenset()
