"""How the router's pool lets workers go: a deregistered (draining) one keeps its channel until its
requests in flight end; a silent (dead) one is cut at once, so its requests are retried now."""

from __future__ import annotations

import asyncio

from pdserve.router.worker_pool import WorkerPool
from pdserve.v1 import common_pb2 as pb


class Channel:
    def __init__(self) -> None:
        self.closed = False

    async def close(self) -> None:
        self.closed = True


def registered(pool: WorkerPool, worker_id: str):
    info = pb.WorkerInfo(worker_id=worker_id, address="127.0.0.1:1", role=pb.WORKER_ROLE_DECODE)
    w = pool.register(info, pb.WorkerLoad())
    real, w.channel = w.channel, Channel()
    return w, real


async def test_a_deregistered_worker_keeps_its_channel_until_its_requests_end():
    pool = WorkerPool()
    w, real = registered(pool, "decode-0")
    w.inflight = 1  # a stream the worker finishes within its grace
    pool.deregister("decode-0")
    assert w not in pool.all  # no new requests
    await asyncio.sleep(0.05)
    assert not w.channel.closed
    w.inflight = 0
    for _ in range(40):
        if w.channel.closed:
            break
        await asyncio.sleep(0.05)
    assert w.channel.closed
    await real.close()


async def test_a_silent_worker_is_dropped_and_its_channel_closed_at_once():
    pool = WorkerPool(lease_ttl_s=0.0)
    w, real = registered(pool, "decode-1")
    w.inflight = 1
    await asyncio.sleep(0.01)
    pool.expire()
    await asyncio.sleep(0)
    assert w not in pool.all and w.channel.closed
    await real.close()
