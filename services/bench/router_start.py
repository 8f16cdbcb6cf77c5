"""How fast a router process comes up, and what it holds: part of `pdserve bench control-plane`.

A fresh process, from spawn to gRPC health SERVING (its worker already up), then its resident memory once
idle and whether torch was mapped into it (issue #20). Why and results: docs/benchmarks.md ("A router without torch").
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

IMPORT = (
    "import time; t = time.perf_counter(); from pdserve.router import serve; "
    "serve.load_tokenizer(''); print(time.perf_counter() - t)"
)


def _serving(target: str) -> bool:
    with grpc.insecure_channel(target) as ch:
        try:
            r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=0.5)
        except grpc.RpcError:
            return False
    return r.status == health_pb2.HealthCheckResponse.SERVING


def _rss_mb(pid: int) -> float:
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def _maps_torch(pid: int) -> bool:
    return "libtorch" in Path(f"/proc/{pid}/maps").read_text()


def once(argv: tuple[str, ...], target: str, idle_s: float, timeout_s: float = 120.0) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not _serving(target):
            if proc.poll() is not None or time.perf_counter() - t0 > timeout_s:
                raise RuntimeError(f"the router exited ({proc.returncode}) or never served: {' '.join(argv)}")
            time.sleep(0.01)
        serving_s = time.perf_counter() - t0
        time.sleep(idle_s)
        return {"serving_s": serving_s, "rss_mb": _rss_mb(proc.pid), "torch_mapped": _maps_torch(proc.pid)}
    finally:
        proc.terminate()
        proc.wait(30)


def measure(argv: tuple[str, ...], target: str, reps: int = 3, idle_s: float = 2.0) -> dict:
    """Medians of `reps` starts of the router `argv` (which serves on `target`)."""
    runs = [once(argv, target, idle_s) for _ in range(reps)]
    imports = [
        float(subprocess.run([sys.executable, "-c", IMPORT], capture_output=True, text=True, check=True).stdout)
        for _ in range(reps)
    ]
    return {
        "runs": runs,
        "serving_s_p50": statistics.median(r["serving_s"] for r in runs),
        "rss_mb_p50": statistics.median(r["rss_mb"] for r in runs),
        "torch_mapped": any(r["torch_mapped"] for r in runs),
        "import_and_tokenizer_s_p50": statistics.median(imports),
        "goal_serving_s": 1.5,
        "goal_rss_mb": 150.0,
    }
