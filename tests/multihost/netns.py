"""A private virtual network of Linux network namespaces, one per "host".

    switch namespace:  br0 (a Linux bridge)
                        |-- v-<name> <== veth ==> <name> namespace: pds0 10.213.X.N/24, lo
                        |-- v-host   <== veth ==> this (the test's) namespace: pds<id> 10.213.X.1/24

Every namespace is named `pds-<id>-<name>` (a random id per run, so parallel runs
do not collide). The only route anywhere is the /24's own connected route and
IPv6 is off on every interface, so nothing is sent to any address outside the
ones assigned here. Traffic between two namespaces really crosses two veth
pairs and the bridge: its bytes show in the interfaces' counters, and
`ip link set pds0 down` in one namespace cuts that "host" off.

Needs root and iproute2 (`ip`). `close()` removes everything; it is also
registered with atexit, so an interrupted run cleans up after itself.
`python -m tests.multihost.netns --cleanup` removes namespaces that a killed run
(SIGKILL skips atexit) left behind.
"""

from __future__ import annotations

import argparse
import atexit
import ipaddress
import json
import os
import random
import secrets
import shutil
import subprocess
import sys
from collections.abc import Sequence

PREFIX = "pds-"
NIC = "pds0"  # the interface inside every namespace (names are per namespace)
SWITCH = "switch"
FIRST_HOST = 10  # namespace i gets 10.213.X.(10 + i); .1 is this namespace


class NetnsError(RuntimeError):
    """A command that builds or changes the network failed."""


def ip(*args: str, check: bool = True) -> str:
    r = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and r.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {r.stderr.strip() or r.returncode}")
    return r.stdout


def unavailable() -> str | None:
    """Why network namespaces cannot be used here, or None when they can."""
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed (Debian: apt-get install -y iproute2)"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    probe = f"{PREFIX}probe-{secrets.token_hex(3)}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if r.returncode != 0:
        return f"`ip netns add` fails here: {r.stderr.strip()}"
    ip("netns", "del", probe, check=False)
    return None


def _free_subnet() -> ipaddress.IPv4Network:
    """A 10.213.X.0/24 that no route of this namespace covers (another run's, or the host's)."""
    routes = [
        ipaddress.ip_network(r["dst"], strict=False)
        for r in json.loads(ip("-j", "route", "show") or "[]")
        if r.get("dst", "default") != "default"
    ]
    for x in random.sample(range(256), 256):
        net = ipaddress.ip_network(f"10.213.{x}.0/24")
        if not any(net.overlaps(r) for r in routes):
            return net
    raise NetnsError("no free 10.213.X.0/24 subnet")


def _ipv6_off(namespace: str | None, interface: str = "all") -> None:
    """No IPv6 (no link-local chatter) on an interface; best effort (a kernel without IPv6 has none)."""
    keys = (f"net/ipv6/conf/{interface}/disable_ipv6",) + (
        ("net/ipv6/conf/default/disable_ipv6",) if interface == "all" else ()
    )
    script = "; ".join(f"echo 1 > /proc/sys/{k}" for k in keys) + " 2>/dev/null; true"
    argv = ["sh", "-c", script]
    subprocess.run(["ip", "netns", "exec", namespace, *argv] if namespace else argv, check=False)


class Network:
    """The namespaces `names` on one bridge; `address[name]` is each one's IPv4 address."""

    def __init__(self, names: Sequence[str]) -> None:
        self.id = secrets.token_hex(3)
        self.subnet = _free_subnet()
        hosts = list(self.subnet.hosts())
        self.gateway = str(hosts[0])  # this namespace's end
        self.address = {name: str(hosts[FIRST_HOST - 1 + i]) for i, name in enumerate(names)}
        self.host_nic = f"pds{self.id}"
        self._created: list[str] = []
        atexit.register(self.close)
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def namespace(self, name: str) -> str:
        return f"{PREFIX}{self.id}-{name}"

    def _add_namespace(self, name: str) -> str:
        ns = self.namespace(name)
        ip("netns", "add", ns)
        self._created.append(ns)
        _ipv6_off(ns)
        ip("-n", ns, "link", "set", "lo", "up")
        return ns

    def _build(self) -> None:
        switch = self._add_namespace(SWITCH)
        ip("-n", switch, "link", "add", "br0", "type", "bridge")
        ip("-n", switch, "link", "set", "br0", "up")
        prefix = self.subnet.prefixlen
        for name, address in self.address.items():
            ns = self._add_namespace(name)
            ip("-n", switch, "link", "add", f"v-{name}", "type", "veth", "peer", "name", NIC, "netns", ns)
            ip("-n", switch, "link", "set", f"v-{name}", "master", "br0", "up")
            ip("-n", ns, "addr", "add", f"{address}/{prefix}", "dev", NIC)
            ip("-n", ns, "link", "set", NIC, "up")
        # Our own leg, so the test process (health checks, the client) reaches them.
        ip("link", "add", self.host_nic, "type", "veth", "peer", "name", "v-host", "netns", switch)
        _ipv6_off(None, self.host_nic)
        ip("-n", switch, "link", "set", "v-host", "master", "br0", "up")
        ip("addr", "add", f"{self.gateway}/{prefix}", "dev", self.host_nic)
        ip("link", "set", self.host_nic, "up")

    def exec_prefix(self, name: str) -> tuple[str, ...]:
        """argv prefix running a command inside namespace `name` (ip execs it: the pid is the command's)."""
        return ("ip", "netns", "exec", self.namespace(name))

    def set_link(self, name: str, up: bool) -> None:
        """Plug in or pull out namespace `name`'s network cable (its pds0)."""
        ip("-n", self.namespace(name), "link", "set", NIC, "up" if up else "down")

    def pids(self, name: str) -> list[int]:
        """The processes in namespace `name`."""
        return [int(p) for p in ip("netns", "pids", self.namespace(name)).split()]

    def counters(self, name: str) -> dict[str, int]:
        """rx_bytes and tx_bytes of namespace `name`'s pds0."""
        link = json.loads(ip("-n", self.namespace(name), "-j", "-s", "link", "show", "dev", NIC))[0]
        stats = link["stats64"]
        return {"rx_bytes": stats["rx"]["bytes"], "tx_bytes": stats["tx"]["bytes"]}

    def close(self) -> None:
        """Remove every namespace (their veths go with them) and our own leg; idempotent."""
        atexit.unregister(self.close)
        for ns in reversed(self._created):
            ip("netns", "del", ns, check=False)
        self._created.clear()
        ip("link", "del", self.host_nic, check=False)  # gone already with its peer, unless the build failed

    def __enter__(self) -> Network:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def leftovers() -> list[str]:
    """Our namespaces of runs that have no process in any of theirs: a killed run's
    (or one still building its network: run this only when no other run is going)."""
    runs: dict[str, list[str]] = {}
    for line in ip("netns", "list").splitlines():
        name = line.split()[0] if line.strip() else ""
        if name.startswith(PREFIX):
            runs.setdefault(name.split("-")[1], []).append(name)
    return [
        n
        for names in runs.values()
        if not any(ip("netns", "pids", n, check=False).strip() for n in names)
        for n in names
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.multihost.netns",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--cleanup", action="store_true", help=f"remove {PREFIX}* namespaces no process is in (left by a killed run)"
    )
    args = parser.parse_args(argv)
    if not args.cleanup:
        parser.print_help()
        return 0
    for ns in leftovers():
        ip("netns", "del", ns, check=False)
        print(f"removed {ns}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
