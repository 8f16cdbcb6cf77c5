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
_CGROUPS = Path("/sys/fs/cgroup")
_SELF = Path("/proc/self/cgroup")
_NO_LIMIT = 2**62  # cgroup v1 writes "no limit" as a page-rounded 2**63 - 1
# Per hierarchy: (folder under _CGROUPS, limit file, usage file, reclaimable page cache in memory.stat).
_V2 = ("", "memory.max", "memory.current", "inactive_file")
_V1 = ("memory", "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")


def available_bytes(meminfo: Path = _MEMINFO, cgroups: Path = _CGROUPS, self_cgroup: Path = _SELF) -> int | None:
    """MemAvailable, or less when a memory cgroup of this process (a container's limit, a
    systemd slice) leaves less; None off Linux."""
    try:
        fields = dict(line.split(":", 1) for line in meminfo.read_text().splitlines() if ":" in line)
        available = int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None
    for left in _cgroup_room(cgroups, self_cgroup):
        available = min(available, left)
    return max(0, available)


def _cgroup_room(cgroups: Path, self_cgroup: Path):
    """What each limited memory cgroup holding this process has left: its limit less its
    usage, page cache that can be reclaimed not counted as used. Ancestors limit too."""
    try:
        lines = self_cgroup.read_text().splitlines()
    except OSError:
        lines = []
    own = {(c.split(":", 2)[1] or "unified"): c.split(":", 2)[2] for c in lines if c.count(":") >= 2}
    for (folder, limit_file, usage_file, cache_key), key in ((_V2, "unified"), (_V1, "memory")):
        mount = cgroups / folder
        path = mount / own.get(key, "/").lstrip("/")
        group = path if path.is_dir() else mount  # a container sees its own group as the root
        for g in (group, *group.parents):
            if not g.is_relative_to(mount):
                break
            try:
                limit_text = (g / limit_file).read_text().strip()
                if limit_text == "max" or int(limit_text) >= _NO_LIMIT:
                    continue
                used = int((g / usage_file).read_text())
            except (OSError, ValueError):
                continue  # not this hierarchy's group, or no limit at this level
            yield int(limit_text) - used + _stat(g, cache_key)


def _stat(group: Path, key: str) -> int:
    try:
        return int(dict(line.split() for line in (group / "memory.stat").read_text().splitlines()).get(key, 0))
    except (OSError, ValueError):
        return 0


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
