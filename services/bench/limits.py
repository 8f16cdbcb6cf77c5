"""This machine's own limits, measured in the run that quotes them.

Benchmarks compare against these instead of datasheet numbers, so a ratio
means the same on a laptop, a 2-core CI box or a server.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass

import torch


def median_time(fn, reps: int = 7, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


@dataclass(frozen=True)
class MachineLimits:
    matmul_gflops: float  # square matmul in the engine's dtype, the compute ceiling
    read_gbps: float  # streaming read (sum of a large tensor), the decode floor
    memcpy_gbps: float  # bytes copied per second (copy_ of a large tensor)
    threads: int
    cpu: str
    dtype: str = "float32"  # of the matmul

    def as_dict(self) -> dict:
        return asdict(self)


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    """The machine a run ran on (nothing measured), for results files."""
    return {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def best_time(fn, reps: int) -> float:
    """The fastest of `reps` calls after one warm-up: what the machine can do, which a noisy moment only hides."""
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def alternated_times(runs: dict, reps: int) -> dict[str, list[float]]:
    """Seconds of each callable's `reps` calls, made in turn after a warm-up: runs that share the host's drift."""
    for f in runs.values():
        f()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(reps):
        for name, f in runs.items():
            t = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t)
    return times


def alternated(runs: dict, reps: int) -> dict[str, float]:
    """Median ms of each callable, called in turn `reps` times after a warm-up (A/B runs)."""
    return {name: statistics.median(ts) * 1e3 for name, ts in alternated_times(runs, reps).items()}


def matmul_probe(device: str = "cpu", dtype: str = "float32") -> tuple:
    """(a square matmul in `dtype`, its FLOPs): the compute ceiling's measure, to time beside a figure."""
    n = 2048
    a, b = (torch.randn(n, n, device=device, dtype=getattr(torch, dtype)) for _ in range(2))
    return (lambda: torch.mm(a, b)), 2 * n**3


def read_probe(device: str = "cpu") -> tuple:
    """(a streaming read of 256 MiB, far beyond cache; its bytes; the tensor it reads): the decode
    floor's measure. The tensor is written, so it also serves as a copy's source (a fresh page reads
    as the shared zero page, from cache)."""
    big = torch.randn((256 << 20) // 4, device=device)
    return (lambda: big.sum()), big.numel() * 4, big


def measure(quick: bool = False, device: str = "cpu", dtype: str = "float32") -> MachineLimits:
    # Limits are the best of several tries, so a busy moment on a shared host can't lower a ceiling
    # or a floor and flatter the figures measured against it (the timings themselves are medians).
    reps = 5 if quick else 9
    matmul, flops = matmul_probe(device, dtype)
    read, nbytes, big = read_probe(device)
    dst = torch.empty_like(big)
    copy = best_time(lambda: dst.copy_(big), reps)
    return MachineLimits(
        matmul_gflops=flops / best_time(matmul, reps) / 1e9,
        read_gbps=nbytes / best_time(read, reps) / 1e9,
        memcpy_gbps=nbytes / copy / 1e9,
        threads=torch.get_num_threads(),
        cpu=cpu_name(),
        dtype=dtype,
    )
