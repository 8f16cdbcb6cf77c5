"""The TCP sockets a process listens on, read from /proc (Linux): what `ss -ltnp` shows for it."""

from __future__ import annotations

import ipaddress
import os
import sys

_LISTEN = "0A"  # TCP state in /proc/net/tcp{,6}


def _address(hex_address: str) -> str:
    """/proc/net/tcp's "0100007F": 32-bit words printed in host byte order. An IPv4-mapped IPv6
    address (gRPC listens on 127.0.0.1 that way) reads as the IPv4 one."""
    words = [int(hex_address[i : i + 8], 16).to_bytes(4, sys.byteorder) for i in range(0, len(hex_address), 8)]
    ip = ipaddress.ip_address(b"".join(words))
    return str(getattr(ip, "ipv4_mapped", None) or ip)


def listening(pid: int) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket process `pid` holds in LISTEN state (in its own network
    namespace)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    found = set()
    for table in ("tcp", "tcp6"):
        with open(f"/proc/{pid}/net/{table}") as f:
            next(f)  # the column names
            for line in f:
                cols = line.split()
                if cols[3] == _LISTEN and cols[9] in inodes:
                    address, port = cols[1].rsplit(":", 1)
                    found.add((_address(address), int(port, 16)))
    return found


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid`."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:  # gone meanwhile
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:  # after "(comm)": state, then ppid
                out.append(int(entry))
    return out
