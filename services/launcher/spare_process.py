"""The spare's own side (spare.py is the launcher's): import what a worker imports, say so, then become
the worker whose command line arrives on stdin, as one line of JSON with the environment to add."""

from __future__ import annotations

import json
import os
import sys
import time

from pdserve.common.launcher_bond import follow_launcher


def main() -> int:
    follow_launcher()  # a spare ends with its launcher, as a service does
    t0 = time.perf_counter()
    import pdserve.cli
    import pdserve.common.worker_runtime  # noqa: F401 - what a worker's start spends most on

    print(f"ready in {time.perf_counter() - t0:.1f} s, for a crashed worker to restart in", flush=True)
    line = sys.stdin.readline()
    if not line:
        return 0  # the launcher stopped, or needs no spare any more
    order = json.loads(line)
    os.environ.update(order["env"])
    return pdserve.cli.main(order["argv"])
