"""A rolling restart of every worker under load: failed requests, and greedy outputs against a reference run.

    .venv/bin/python benchmarks/rolling_restart.py [--json benchmarks/results/rolling_restart.json]

Starts `pdserve up --prefill 2 --decode 2` (float32: docs/reliability.md says why), measures its
capacity with a burst of `pdserve bench load`, then runs the same seeded workload at half of it
twice: once undisturbed (the reference), once while `pdserve restart --rolling` restarts every
worker. Each request's output token ids are compared by digest.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PY = sys.executable
WORKLOAD = ["--prompt-len", "uniform:32:128", "--output-len", "fixed:32", "--seed", "7", "--no-progress"]


def bench_load(target: str, out: Path, rate: str, n: int) -> dict:
    subprocess.run(
        [
            PY,
            "-m",
            "pdserve",
            "bench",
            "load",
            "--target",
            target,
            "--rate",
            rate,
            "--num-requests",
            str(n),
            "--json",
            str(out),
            *WORKLOAD,
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return json.loads(out.read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=50351)
    parser.add_argument("--seconds", type=float, default=90.0, help="length of each run at half capacity")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="rolling-"))
    env = {**os.environ, "PDSERVE_RUN_DIR": str(work)}
    target = f"127.0.0.1:{args.port}"
    log = open(work / "up.log", "w+")
    up = subprocess.Popen(
        [
            PY,
            "-m",
            "pdserve",
            "up",
            "--no-spare",  # its imports would share the cores with the reference run's first seconds
            "--prefill",
            "2",
            "--decode",
            "2",
            "--port",
            str(args.port),
            "--base-port",
            str(args.port + 10),
            "--http-port",
            "-1",
            "--metrics-port",
            "-1",
            "--dtype",
            "float32",
            "--kv-cache-gib",
            "0.5",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    try:
        while "ready; clients connect" not in (work / "up.log").read_text():
            if up.poll() is not None or time.sleep(1):
                raise SystemExit(f"pdserve up failed:\n{(work / 'up.log').read_text()[-3000:]}")
        burst = bench_load(target, work / "burst.json", "inf", 16)
        capacity = burst["summary"]["throughput_rps"]
        rate = capacity / 2
        n = max(8, math.ceil(rate * args.seconds))
        reference = bench_load(target, work / "reference.json", f"{rate:.3f}", n)
        restart = subprocess.Popen(
            [PY, "-m", "pdserve", "restart", "--rolling", "--target", target, "--wait", "600"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        rolled = bench_load(target, work / "rolled.json", f"{rate:.3f}", n)
        said, _ = restart.communicate(timeout=600)
    finally:
        up.send_signal(signal.SIGTERM)
        up.wait(120)
    ref = {r["index"]: r for r in reference["requests"]}
    failed = [r for r in rolled["requests"] if r["error"] or r["output_tokens"] != r["max_tokens"]]
    differ = [r["index"] for r in rolled["requests"] if r["output_digest"] != ref[r["index"]]["output_digest"]]
    steps = [
        line.split("pdserve up: ", 1)[1]
        for line in (work / "up.log").read_text().splitlines()
        if "rolling restart" in line
    ]
    result = {
        "machine": burst["machine"],
        "capacity_rps": capacity,
        "rate_rps": rate,
        "requests": n,
        "restart_exit": restart.returncode,
        "restart_said": said.strip(),
        "roll_steps": steps,
        "failed": len(failed),
        "differ_from_reference": len(differ),
        "load_s": rolled["summary"]["duration_s"],
        "reference_summary": reference["summary"],
        "rolled_summary": rolled["summary"],
    }
    print(json.dumps({k: v for k, v in result.items() if not k.endswith("summary")}, indent=1))
    for name in ("reference", "rolled"):
        s = result[f"{name}_summary"]
        print(
            f"{name}: {s['completed']} of {n} completed, TTFT p50 {s['ttft_ms']['p50']:.0f} ms, "
            f"TPOT p50 {s['tpot_ms']['p50']:.0f} ms"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0 if not failed and not differ and restart.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
