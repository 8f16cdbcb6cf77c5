"""The KV data plane listens where it was told: UCX's TCP listeners sit on the interfaces of the
service's --data-host (default --host) and nowhere else (docs/security.md, "Ports")."""

from __future__ import annotations

import contextlib
import os

import pytest

from pdserve.common.transfer import netdev
from pdserve.kvstore import serve as kvstore_serve
from pdserve.kvstore.config import KVStoreConfig
from tests.sockets import listening

OUTSIDE = [str(a) for _, a, loopback in netdev.interface_addresses() if not loopback and not a.is_link_local]
needs_another_interface = pytest.mark.skipif(
    not OUTSIDE, reason="only loopback here: every listener would be on 127.0.0.1 whatever the code does"
)


@contextlib.asynccontextmanager
async def kvstore(**settings):
    """A KV store service in this process (gRPC server, UCX receiver and sender); yields the
    listeners it opened."""
    before = listening(os.getpid())
    config = KVStoreConfig(port=0, capacity_blocks=4, **settings)
    server, _, service = kvstore_serve.build(config, block_bytes=64)
    await server.start()
    try:
        yield listening(os.getpid()) - before
    finally:
        await server.stop(grace=0)
        await service.aclose()


@needs_another_interface
async def test_a_service_on_127_0_0_1_listens_on_127_0_0_1_only_ucx_included():
    async with kvstore(host="127.0.0.1") as opened:
        assert len(opened) >= 3  # gRPC, and a UCX listener for each of the receiver and the sender
        assert {address for address, _ in opened} == {"127.0.0.1"}, opened


@needs_another_interface
async def test_the_data_plane_listens_on_its_data_host_and_grpc_on_its_host():
    outside = OUTSIDE[0]
    interface = next(name for name, a, _ in netdev.interface_addresses() if str(a) == outside)
    # UCX binds an interface (its first address of the family), not an address.
    on_interface = {str(a) for name, a, _ in netdev.interface_addresses() if name == interface}
    async with kvstore(host="127.0.0.1", data_host=outside) as opened:
        addresses = [address for address, _ in opened]
        assert addresses.count("127.0.0.1") == 1, opened  # gRPC
        ucx = [a for a in addresses if a != "127.0.0.1"]
        assert len(ucx) >= 2 and set(ucx) <= on_interface, opened


def test_a_data_host_that_is_not_this_machines_is_refused_by_name():
    with pytest.raises(ValueError, match=r"data host '203.0.113.7' \(--data-host, else --host\): no network interface"):
        kvstore_serve.build(KVStoreConfig(port=0, capacity_blocks=4, data_host="203.0.113.7"), block_bytes=64)


def test_a_wildcard_host_keeps_every_interface_and_a_users_ucx_net_devices_wins(monkeypatch):
    assert netdev.ucx_options("0.0.0.0") == {} and netdev.ucx_options("::") == {}
    assert netdev.ucx_options("127.0.0.1")["NET_DEVICES"].split(",")[0] == "lo"
    assert netdev.ucx_options("::1")["TCP_AF_PRIO"] == "inet6"  # else UCX would take lo's IPv4 address
    monkeypatch.setenv("UCX_NET_DEVICES", "eth9")
    assert netdev.ucx_options("127.0.0.1") == {}
