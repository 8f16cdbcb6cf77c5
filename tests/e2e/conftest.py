"""Fixtures that start the suite as real OS processes (pdserve.launcher.Suite)."""

from __future__ import annotations

import random
import socket

import pytest


def free_port_run(n: int) -> int:
    """First of n consecutive free TCP ports on 127.0.0.1."""
    for _ in range(200):
        base = random.randrange(20000, 60000 - n)
        socks = []
        try:
            for p in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free ports")


@pytest.fixture(scope="module")
def start_suite(tmp_path_factory):
    """start_suite(mode) -> a started Suite; stopped at the end of the module.
    Tests of a module that ask for the same suite share it (starting one costs ~20 s)."""
    from pdserve.launcher import Suite

    suites = {}

    def start(mode: str, **kw):
        key = (mode, repr(sorted(kw.items())))
        if key in suites:
            return suites[key]
        base = free_port_run(4)
        # HTTP port 0: the routers' OpenAI ports must not collide across suites;
        # local prefill never: these tests exercise the disaggregated path.
        kw["env"] = {"PDSERVE_HTTP_PORT": "0", "PDSERVE_LOCAL_PREFILL": "never", **kw.get("env", {})}
        kw.setdefault("dtype", "float32")  # tests compare tokens with transformers' fp32 greedy continuation
        suite = Suite(
            mode=mode,
            port=base,
            base_port=base + 1,
            kv_cache_gib=0.25,
            log_dir=tmp_path_factory.mktemp(f"logs-{mode}"),
            ready_timeout=240,
            **kw,
        )
        suite.start()
        suites[key] = suite
        return suite

    yield start
    for s in suites.values():
        s.stop()
