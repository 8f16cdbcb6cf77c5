"""The ports a service listens on, and whether another process already holds one.

UCX's KV listeners are not here: UCX picks them (ephemeral ports) when a worker
starts, so there is nothing to try beforehand.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Listen:
    """One port a service listens on, and the `pdserve up` flag that moves it."""

    host: str
    port: int
    flag: str


def host_port(host: str, port: int) -> str:
    """HOST:PORT as gRPC and URLs take it: a bare IPv6 address in brackets (`[::1]:50051`)."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def in_use(host: str, port: int) -> bool:
    """Whether another socket listens on host:port: a bind as gRPC's own fails
    with EADDRINUSE. SO_REUSEADDR, as gRPC sets it, so the TIME_WAIT connections
    of a suite just stopped do not count. Other errors (an address of another
    machine or namespace, a privileged port) are the service's to report."""
    try:
        addresses = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror:
        return False
    for family, kind, proto, _, address in addresses:
        try:  # a family the kernel lacks (IPv6 turned off) fails here, not at the bind
            with socket.socket(family, kind, proto) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:  # gRPC's [::] is dual-stack: an IPv4 listener takes it too
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                s.bind(address)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return True
    return False


def first_taken(listens: Iterable[Listen]) -> Listen | None:
    """The first of `listens` (port 0: any free port, never taken) that another process holds."""
    return next((listen for listen in listens if listen.port > 0 and in_use(listen.host, listen.port)), None)


def free_run(host: str, first: int, count: int, step: int = 100, tries: int = 50) -> int:
    """The first of first, first + step, ... that begins `count` ports no process holds on host: a
    run of ports to start a suite on, away from whatever took some (an outgoing connection's
    ephemeral port, a server left running). OSError if none of `tries` is free."""
    for start in range(first, first + step * tries, step):
        if not any(in_use(host, port) for port in range(start, start + count)):
            return start
    raise OSError(errno.EADDRINUSE, f"no {count} free ports in a row on {host} from {first} (step {step})")
