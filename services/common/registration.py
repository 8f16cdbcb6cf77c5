"""A worker announcing itself to routers: register, heartbeat with load, leave.

Routers drop a worker whose heartbeats stop (its lease expires), so a dead
worker leaves the registry without anyone having to notice the death.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import grpc

from pdserve.common.security import OPEN, SecurityConfig
from pdserve.v1 import common_pb2 as pb
from pdserve.v1 import router_pb2 as rpb
from pdserve.v1 import router_pb2_grpc

log = logging.getLogger(__name__)


class Registration:
    def __init__(self, routers: list[str], load: Callable[[], pb.GetLoadResponse], security: SecurityConfig = OPEN):
        self.load = load
        self._stubs = {r: router_pb2_grpc.RouterStub(security.dial(r)) for r in routers}
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self._stubs:
            self._task = asyncio.create_task(self._run(), name="registration")

    async def _run(self) -> None:
        known = {r: False for r in self._stubs}
        interval = 0.5
        while True:
            state = self.load()
            for target, stub in self._stubs.items():
                try:
                    if not known[target]:
                        r = await stub.RegisterWorker(
                            rpb.RegisterWorkerRequest(info=state.info, load=state.load), timeout=2
                        )
                        interval = max(0.1, r.heartbeat_interval_ms / 1000 or interval)
                        known[target] = True
                        log.info("registered with router %s", target)
                    else:
                        r = await stub.Heartbeat(
                            rpb.HeartbeatRequest(worker_id=state.info.worker_id, load=state.load), timeout=2
                        )
                        known[target] = r.known  # a restarted router forgot us: register again
                except grpc.aio.AioRpcError as e:
                    if known[target]:
                        log.warning("router %s unreachable: %s", target, e.code().name)
                    known[target] = False
            await asyncio.sleep(interval)

    async def stop(self) -> None:
        """Leave every router at once (drain), instead of waiting for lease expiry."""
        if self._task:
            self._task.cancel()
        worker_id = self.load().info.worker_id
        for stub in self._stubs.values():
            try:
                await stub.DeregisterWorker(rpb.DeregisterWorkerRequest(worker_id=worker_id), timeout=2)
            except grpc.aio.AioRpcError:
                pass
