"""The default `pdserve up` on the bundled model, as a user runs it: its memory, as
docs/memory.md states it, and Ctrl-C while a stream is still open."""

from __future__ import annotations

import http.client
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from pdserve.client import Client
from pdserve.common import memory
from tests.e2e.conftest import free_port_run
from tests.sockets import children

pytestmark = pytest.mark.slow

LIMIT = 4 * 10**9  # bytes: the "under 4 GB in all"
BANNER = re.compile(r"^\[(prefill-0|decode-0|kvstore)\] \w+: (?:KV cache|capacity) ([\d.]+) GiB \(")
FLOORS = {
    "prefill-0": memory.WORKER_KV.floor_gib,
    "decode-0": memory.WORKER_KV.floor_gib,
    "kvstore": memory.STORE_CAPACITY.floor_gib,
}


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def lines_of(proc: subprocess.Popen) -> queue.Queue:
    out: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [out.put(line.rstrip("\n")) for line in proc.stdout], daemon=True).start()
    return out


def sse_events(response: http.client.HTTPResponse):
    """The data of an OpenAI SSE stream, parsed ([DONE] as itself)."""
    for raw in response:
        if raw.startswith(b"data: "):
            data = raw[6:].strip().decode()
            yield data if data == "[DONE]" else json.loads(data)


def test_the_default_suite_takes_under_4_gb_and_ctrl_c_tells_an_open_stream_why_it_ends():
    base = free_port_run(7)
    argv = [
        sys.executable,
        "-m",
        "pdserve",
        "up",
        "--port",
        str(base),
        "--base-port",
        str(base + 1),
        "--http-port",
        str(base + 5),
        "--metrics-port",
        "0",
        "--grace",
        "6",
        "--prefill",
        "1",
        "--decode",
        "1",
    ]  # the defaults but these; the largest suite auto picks on 2 cores
    env = {k: v for k, v in os.environ.items() if not k.startswith("PDSERVE_")}
    launcher = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    out, log, sizes = lines_of(launcher), [], {}
    try:
        deadline = time.monotonic() + 300  # a first run converts the model
        while not any(line.startswith("pdserve up: ready") for line in log):
            assert launcher.poll() is None and time.monotonic() < deadline, "\n".join(log)
            try:
                log.append(out.get(timeout=1))
            except queue.Empty:
                continue
            if m := BANNER.match(log[-1]):
                sizes[m[1]] = float(m[2])
        with Client(f"127.0.0.1:{base}", timeout=120) as client:  # measured after it has served
            assert client.complete("What is the capital of France?", max_tokens=16).token_ids
        while not any(line.startswith("[spare] ready in") for line in log):  # and its spare has imported
            assert launcher.poll() is None and time.monotonic() < deadline + 60, "\n".join(log)
            try:
                log.append(out.get(timeout=1))
            except queue.Empty:
                continue
        pids = [launcher.pid, *children(launcher.pid)]
        per_process = {pid: rss(pid) for pid in pids}

        conn = http.client.HTTPConnection("127.0.0.1", base + 5, timeout=120)
        body = {"prompt": "Count to a thousand:", "max_tokens": 2000, "ignore_eos": True, "stream": True}
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        events = sse_events(conn.getresponse())
        assert "choices" in next(events)
        launcher.send_signal(signal.SIGINT)  # Ctrl-C: the router drains 6 - 5 s, then cuts with a word
        rest = list(events)
        assert rest[-1] == "[DONE]" and rest[-2]["error"]["message"] == "the server is shutting down", rest[-3:]
        assert launcher.wait(60) == 0
    finally:
        launcher.send_signal(signal.SIGINT)
        launcher.wait(60)
    assert sizes.keys() == FLOORS.keys(), log  # each KV holder printed what it chose
    assert len(pids) == 6  # the launcher, the router, two workers, the store and a spare worker process
    # With more free memory the KV sizes grow past their floors, by design: what they add
    # beyond the floors is allowed on top (on the 24 GiB machine of docs/memory.md, 0.05 GiB).
    beyond_floors = sum(max(0.0, gib - FLOORS[name]) for name, gib in sizes.items()) * memory.GIB
    assert sum(per_process.values()) < LIMIT + beyond_floors, (per_process, sizes)
