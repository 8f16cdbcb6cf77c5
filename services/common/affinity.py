"""Which CPU cores a process, or one thread of it, runs on (Linux affinity)."""

from __future__ import annotations

import math
import os
from pathlib import Path


def available() -> list[int]:
    """The cores this process may run on."""
    return sorted(os.sched_getaffinity(0))


def _own_cgroup(controller: str) -> str:
    """This process's cgroup path (v2: controller ""); "/" if unknown."""
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if controller in controllers.split(","):
                return path
    except (OSError, ValueError):
        pass
    return "/"


def _quota_at(d: Path) -> float | None:
    try:
        if (d / "cpu.max").exists():  # cgroup v2
            quota, period = (d / "cpu.max").read_text().split()[:2]
        else:
            quota, period = ((d / f"cpu.cfs_{k}_us").read_text().strip() for k in ("quota", "period"))
        return None if quota in ("max", "-1") else int(quota) / int(period)
    except (OSError, ValueError):
        return None


def cpu_quota(root: Path = Path("/sys/fs/cgroup"), own: str | None = None) -> float | None:
    """The cores' worth of time this process's cgroup may use (a container's --cpus, a pod's
    CPU limit, a unit's CPUQuota=), which neither torch nor the affinity mask sees; None: no
    limit. The tightest on the way from its own cgroup (`own`, else /proc/self/cgroup's) up to
    the root: in a container that root is its own cgroup."""
    v2 = (root / "cgroup.controllers").exists() or (root / "cpu.max").exists()
    base = root if v2 else root / "cpu"
    path = own if own is not None else _own_cgroup("" if v2 else "cpu")
    dirs = [base]
    for part in filter(None, path.split("/")):
        dirs.append(dirs[-1] / part)
    quotas = [q for q in map(_quota_at, dirs) if q is not None]
    return min(quotas, default=None)


def usable_cores(root: Path = Path("/sys/fs/cgroup"), own: str | None = None) -> int:
    """Cores this process can keep busy: its affinity mask, within its cgroup's CPU quota."""
    quota = cpu_quota(root, own)
    return max(1, min(len(available()), math.ceil(quota) if quota else len(available())))


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
