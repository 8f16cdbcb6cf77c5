"""The pdserve suite spread over network namespaces: one "host" per service.

`pdserve up`'s own plan and supervisor (pdserve.launcher), with each service's
--host set to its namespace's address and its command run inside that
namespace (`ip netns exec`). The control plane (gRPC) and the KV data plane
(UCX) then cross the virtual network of tests/multihost/netns.py.

UCX is held to TCP on the namespace's interface: by default it would see that
all processes share one kernel and move KV through shared memory or CMA,
around the network.

By hand (as root): `python -m tests.multihost.suite` starts it and runs until
Ctrl-C, then removes the namespaces.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence

from pdserve.launcher import Suite, plan, supervise
from tests.multihost.netns import NIC, Network

ENV = {
    "UCX_TLS": "tcp,self",
    "UCX_NET_DEVICES": NIC,
    # Every request disaggregated: the KV must cross the network.
    "PDSERVE_LOCAL_PREFILL": "never",
}


def names(prefill: int, decode: int) -> list[str]:
    return ["router", *(f"prefill-{i}" for i in range(prefill)), *(f"decode-{i}" for i in range(decode)), "kvstore"]


def netns_suite(
    net: Network,
    prefill: int,
    decode: int,
    *,
    env: dict[str, str] | None = None,
    kv_cache_gib: float = 0.25,
    dtype: str | None = None,
    **suite_kw,
) -> Suite:
    """A Suite whose services each run in their own namespace of `net` (made with `names(prefill, decode)`).
    Every namespace has its own ports, so the default ports serve every run."""
    services = plan(
        "disaggregated",
        prefill,
        decode,
        hosts=net.address,
        kv_cache_gib=kv_cache_gib,
        dtype=dtype,
        http_port=-1,
        metrics_port=-1,
    )
    placed = [
        dataclasses.replace(s, argv=(*net.exec_prefix(s.name), *s.argv)) if s.address else s for s in services
    ]  # the one-shot model step needs no network
    return Suite(services=placed, env={**ENV, **(env or {})}, **suite_kw)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.multihost.suite",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--prefill", type=int, default=2)
    parser.add_argument("--decode", type=int, default=2)
    args = parser.parse_args(argv)
    with Network(names(args.prefill, args.decode)) as net:
        print(
            f"network {net.subnet}: " + ", ".join(f"{n} {net.namespace(n)} {a}" for n, a in net.address.items()),
            flush=True,
        )
        return supervise(netns_suite(net, args.prefill, args.decode))


if __name__ == "__main__":
    sys.exit(main())
