"""The suite as real processes on --host 127.0.0.1 listens on 127.0.0.1 only: gRPC, HTTP,
metrics and UCX's data-plane listeners alike (docs/security.md, "Ports")."""

from __future__ import annotations

import os

from tests.service.test_listeners import needs_another_interface
from tests.sockets import children, listening


def _role(pid: int) -> str | None:
    """What a `pdserve serve ROLE` process serves; None for any other process."""
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        argv = f.read().decode().split("\0")
    return argv[argv.index("serve") + 1] if "serve" in argv else None


@needs_another_interface
def test_every_process_of_the_suite_listens_on_127_0_0_1_only(start_suite):
    start_suite("disaggregated", metrics_port=0)
    held = {role: listening(pid) for pid in children(os.getpid()) if (role := _role(pid))}
    assert sorted(held) == ["decode", "kvstore", "prefill", "router"], held
    assert {address for sockets in held.values() for address, _ in sockets} == {"127.0.0.1"}, held
    for role in ("prefill", "decode", "kvstore"):  # gRPC, metrics, and at least one UCX worker's listener
        assert len(held[role]) >= 3, held
