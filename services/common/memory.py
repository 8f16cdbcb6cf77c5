"""Default memory sizes from the memory this machine (or container) has free.

A KV pool or store capacity left at 0 takes a fraction of the memory available
when the service starts, between a floor and a cap. docs/memory.md has what
each service takes and why these fractions keep a default suite small.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

GIB = 2**30
_MEMINFO = Path("/proc/meminfo")
_CGROUP = Path("/sys/fs/cgroup")  # cgroup v2, as a container sees its own group


def available_bytes(meminfo: Path = _MEMINFO, cgroup: Path = _CGROUP) -> int | None:
    """MemAvailable, or less when a cgroup (a container's limit) leaves less; None off Linux."""
    try:
        fields = dict(line.split(":", 1) for line in meminfo.read_text().splitlines() if ":" in line)
        available = int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None
    try:
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            available = min(available, int(limit) - int((cgroup / "memory.current").read_text()))
    except (OSError, ValueError):
        pass  # no cgroup v2 limit visible: the machine's figure stands
    return max(0, available)


@dataclass(frozen=True)
class Sizing:
    """A size in GiB, and how it was chosen (for the start-up banner)."""

    gib: float
    how: str  # "given", or the rule that chose it

    def __str__(self) -> str:
        return f"{self.gib:.2f} GiB ({self.how})"


@dataclass(frozen=True)
class AutoSize:
    """`fraction` of the available memory, within [floor_gib, cap_gib]."""

    fraction: float
    floor_gib: float
    cap_gib: float

    def __str__(self) -> str:  # for --help
        return f"{self.share} of the memory available at start, {self.floor_gib:g} to {self.cap_gib:g} GiB"

    @property
    def share(self) -> str:
        return f"1/{round(1 / self.fraction)}"

    def choose(self, given_gib: float, available: int | None = None) -> Sizing:
        """`given_gib` when it is set (> 0); else the rule applied to `available` bytes
        (default: what this machine has free now)."""
        if given_gib > 0:
            return Sizing(given_gib, "given")
        available = available_bytes() if available is None else available
        if available is None:
            return Sizing(self.floor_gib, "the floor: the memory available is unknown here")
        want = available * self.fraction / GIB
        rule = f"{self.share} of {available / GIB:.1f} GiB available"
        if want < self.floor_gib:
            return Sizing(self.floor_gib, f"the floor; {rule} would be {want:.2f}")
        if want > self.cap_gib:
            return Sizing(self.cap_gib, f"the cap; {rule} would be {want:.2f}")
        return Sizing(round(want, 3), rule)


# A worker's pool bounds its context and its concurrency (a request whose KV does not fit
# is refused); the store is a cache that only saves recomputation, so it gets less. Together
# a default suite's three take about 1/35 of the free memory (docs/memory.md).
WORKER_KV = AutoSize(fraction=1 / 96, floor_gib=0.375, cap_gib=8.0)
STORE_CAPACITY = AutoSize(fraction=1 / 128, floor_gib=0.125, cap_gib=16.0)
