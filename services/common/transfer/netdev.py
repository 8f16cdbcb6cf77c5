"""Where the KV data plane may listen: the UCX options that hold it to one host address.

UCX's TCP transport opens a listening socket on every network interface it is
allowed. These options allow only the interfaces that hold the service's data
host (its --data-host, else its --host), plus RDMA ports, which open no socket;
shared memory and CMA are not network devices and stay. A wildcard host keeps
every interface, and a user's own UCX_NET_DEVICES wins. See docs/security.md.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import ipaddress
import os
import socket
from pathlib import Path

_IFF_LOOPBACK = 0x8


class _SockAddr(ctypes.Structure):
    _fields_ = [("family", ctypes.c_ushort), ("data", ctypes.c_ubyte * 26)]  # room for sockaddr_in6


class _IfAddrs(ctypes.Structure):
    pass


_IfAddrs._fields_ = [
    ("next", ctypes.POINTER(_IfAddrs)),
    ("name", ctypes.c_char_p),
    ("flags", ctypes.c_uint),
    ("addr", ctypes.POINTER(_SockAddr)),
    ("netmask", ctypes.POINTER(_SockAddr)),
    ("ifu", ctypes.c_void_p),
    ("data", ctypes.c_void_p),
]


def _ip(sa: _SockAddr) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if sa.family == socket.AF_INET:  # port (2 bytes), then the address
        return ipaddress.IPv4Address(bytes(sa.data[2:6]))
    if sa.family == socket.AF_INET6:  # port (2), flow info (4), then the address
        return ipaddress.IPv6Address(bytes(sa.data[6:22]))
    return None


def interface_addresses() -> list[tuple[str, ipaddress.IPv4Address | ipaddress.IPv6Address, bool]]:
    """(interface, address, is loopback) for every IP address of this machine (getifaddrs(3))."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    head = ctypes.POINTER(_IfAddrs)()
    if libc.getifaddrs(ctypes.byref(head)) != 0:
        raise OSError(ctypes.get_errno(), "getifaddrs failed")
    out = []
    try:
        node = head
        while node:
            entry = node.contents
            ip = _ip(entry.addr.contents) if entry.addr else None
            if ip is not None:
                out.append((entry.name.decode(), ip, bool(entry.flags & _IFF_LOOPBACK)))
            node = entry.next
    finally:
        libc.freeifaddrs(head)
    return out


def resolve(host: str) -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """The addresses `host` (a name, or an address, bracketed or not) stands for."""
    try:
        infos = socket.getaddrinfo(host.strip("[]"), None, proto=socket.IPPROTO_TCP)
    except socket.gaierror as e:
        raise ValueError(f"data host {host!r} (--data-host, else --host): cannot resolve it: {e}") from None
    return {ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos}


def devices_for(host: str, ips: set) -> list[str] | None:
    """The interfaces that hold `ips` (what `host` resolves to); None for a wildcard (all of them).
    A loopback address the kernel routes to lo without lo listing it (127.0.0.2) counts as lo's."""
    if any(ip.is_unspecified for ip in ips):
        return None
    held = interface_addresses()
    devices = {name for name, addr, _ in held if addr in ips}
    if not devices and all(ip.is_loopback for ip in ips):
        devices = {name for name, _, loopback in held if loopback}
    if not devices:
        raise ValueError(
            f"data host {host!r} (--data-host, else --host): no network interface of this "
            f"machine holds {', '.join(sorted(map(str, ips)))}; give an address of this machine, "
            "or set UCX_NET_DEVICES"
        )
    return sorted(devices)


def rdma_ports(root: str = "/sys/class/infiniband") -> list[str]:
    """UCX's names ("mlx5_0:1") of the RDMA ports here: they carry KV across machines and open no socket."""
    return sorted(f"{Path(p).parent.parent.name}:{Path(p).name}" for p in glob.glob(f"{root}/*/ports/*"))


def data_host(config) -> str:
    """Where a service's KV data plane listens: its --data-host, else its --host."""
    return config.data_host or config.host


def ucx_options(host: str) -> dict[str, str]:
    """UCX context options for a data plane on `host`; {} where UCX's defaults (or the user's own
    UCX_NET_DEVICES) apply."""
    if "UCX_NET_DEVICES" in os.environ:
        return {}
    ips = resolve(host)
    devices = devices_for(host, ips)
    if devices is None:
        return {}
    options = {"NET_DEVICES": ",".join(devices + rdma_ports())}
    if all(ip.version == 6 for ip in ips) and "UCX_TCP_AF_PRIO" not in os.environ:
        options["TCP_AF_PRIO"] = "inet6"  # else UCX listens on the interface's IPv4 address
    return options
