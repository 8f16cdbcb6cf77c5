"""A worker's KV-store client against a real store process that freezes: the first request waits
out the timeout, the next ones do without the store until it is asked again."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from pdserve.common.kv.store_client import StoreClient
from pdserve.common.transfer.loopback import LoopbackKVReceiver, LoopbackKVSender

_STORE = """
import asyncio
from pdserve.kvstore import serve
from pdserve.kvstore.config import KVStoreConfig

async def main():
    server, port, service = serve.build(KVStoreConfig(port=0, capacity_blocks=8), block_bytes=64)
    await service.start()
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()

asyncio.run(main())
"""


@pytest.fixture
def store():
    proc = subprocess.Popen([sys.executable, "-c", _STORE], stdout=subprocess.PIPE, text=True)
    try:
        yield proc, int(proc.stdout.readline())
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
            proc.wait()


async def _timed(call) -> tuple[float, object]:
    t = time.monotonic()
    result = await call
    return time.monotonic() - t, result


async def test_a_frozen_store_costs_one_timeout_then_is_left_alone_until_asked_again(store):
    proc, port = store
    client = StoreClient(f"127.0.0.1:{port}", LoopbackKVReceiver(), LoopbackKVSender(), bytes(16), timeout_s=0.5)
    hashes, dest = [b"\1" * 16], [np.zeros(64, np.uint8)]
    try:
        assert await client.load_prefix(hashes, dest, 0) == 0  # it answers: nothing there
        os.kill(proc.pid, signal.SIGSTOP)  # frozen: connected, never answering
        took, loaded = await _timed(client.load_prefix(hashes, dest, 0))
        assert loaded == 0 and took >= 0.45 and client.paused_until > time.monotonic()
        took, loaded = await _timed(client.load_prefix(hashes, dest, 0))
        assert loaded == 0 and took < 0.2  # the next request did not wait
        assert await client.store_blocks(hashes, dest) == 0
        os.kill(proc.pid, signal.SIGCONT)
        client.paused_until = 0.0  # the pause is over
        assert await client.load_prefix(hashes, dest, 0) == 0 and client._pause_s == 0  # answered again
    finally:
        await client.aclose()


async def test_a_store_that_refuses_connections_is_not_paused(store):
    proc, port = store
    proc.kill()
    proc.wait()
    client = StoreClient(f"127.0.0.1:{port}", LoopbackKVReceiver(), LoopbackKVSender(), bytes(16), timeout_s=5.0)
    try:
        took, loaded = await _timed(client.load_prefix([b"\1" * 16], [np.zeros(64, np.uint8)], 0))
        assert loaded == 0 and took < 2.0 and client.paused_until == 0.0  # refused at once: it cost nothing
    finally:
        await client.aclose()


async def test_a_read_the_worker_gave_up_on_is_released_and_the_store_unpins_its_blocks(monkeypatch):
    """The worker waited its timeout for the store's push: without a Release the push kept its blocks
    pinned (never evicted) until the store's own transfer timeout, 30 s."""
    import asyncio

    from pdserve.kvstore import serve
    from pdserve.kvstore.config import KVStoreConfig
    from tests.polling import settles

    server, port, service = serve.build(KVStoreConfig(port=0, capacity_blocks=8, transport="loopback"), block_bytes=64)
    await service.start()
    await server.start()
    client = StoreClient(f"127.0.0.1:{port}", LoopbackKVReceiver(), LoopbackKVSender(), bytes(16), timeout_s=0.5)
    try:
        hashes = [b"\1" * 16]
        assert await client.store_blocks(hashes, [np.ones(64, np.uint8)]) == 1

        async def stalled(*args, **kwargs):  # a push that does not get through
            await asyncio.sleep(3600)

        monkeypatch.setattr(service.sender, "send", stalled)
        assert await client.load_prefix(hashes, [np.zeros(64, np.uint8)], 0) == 0  # given up: computed instead
        assert await settles(lambda: service.store.pinned == 0 and service.active_leases == 0, timeout=5)
    finally:
        await server.stop(grace=0)
        await service.aclose()


async def test_a_store_of_another_block_size_is_said_once_and_then_left_alone(store, caplog):
    _, port = store  # its blocks are 64 bytes; this worker's 32 (another dtype, say)
    client = StoreClient(f"127.0.0.1:{port}", LoopbackKVReceiver(), LoopbackKVSender(), bytes(16), timeout_s=5.0)
    hashes, src = [b"\2" * 16], [np.ones(32, np.uint8)]
    try:
        with caplog.at_level("ERROR", logger="pdserve.common.kv.store_client"):
            assert await client.store_blocks(hashes, src) == 0
            assert await client.store_blocks(hashes, src) == 0  # not asked again: nothing would fit
        (said,) = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert "blocks of 64 bytes, this worker's are 32" in said and "--dtype" in said
        assert client.paused_until == float("inf") and await client.load_prefix(hashes, src, 0) == 0
    finally:
        await client.aclose()
