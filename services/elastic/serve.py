"""`pdserve serve elastic`: one engine behind Prefill, Decode and WorkerControl.

A router moves it between prefill, decode and both (WorkerControl.SetRole);
the prefill and decode halves are the same workers the fixed roles run.
"""

from __future__ import annotations

from pdserve.common.kv.store_client import StoreClient
from pdserve.common.transfer.transport import make_receiver, make_sender
from pdserve.common.worker_config import WorkerConfig
from pdserve.common.worker_runtime import SERVICES, WorkerRuntime
from pdserve.decode.serve import add_decode_worker
from pdserve.elastic.role import ElasticRole
from pdserve.elastic.servicer import WorkerControlServicer
from pdserve.prefill.serve import add_prefill_worker
from pdserve.v1 import worker_pb2, worker_pb2_grpc


class ElasticProcess:
    """The runtime, both workers on its engine, and the KV data plane; `aclose` closes them."""

    def __init__(self, config: WorkerConfig, engine=None):
        self.runtime = rt = WorkerRuntime(config, engine)
        self.role = ElasticRole(config.role, {}, on_switch=rt.set_role)
        self.sender = make_sender(config)
        self.receiver = make_receiver(config)
        self.store = None
        if config.kvstore:  # one client for both halves: reads prefixes in, offers computed ones back
            self.store = StoreClient(
                config.kvstore, self.receiver, self.sender, rt.engine.spec.fingerprint, security=config
            )
        self.prefill = add_prefill_worker(rt, config, self.sender, self.store, self.role.gate("prefill"))
        self.decode = add_decode_worker(rt, config, self.receiver, self.store, self.role.gate("decode"))
        self.role.idle.update(prefill=self.prefill.idle, decode=self.decode.idle)
        worker_pb2_grpc.add_WorkerControlServicer_to_server(WorkerControlServicer(self.role), rt.server)
        rt.services = [
            SERVICES["prefill"],
            SERVICES["decode"],
            worker_pb2.DESCRIPTOR.services_by_name["WorkerControl"].full_name,
        ]
        rt.info.elastic = True

    async def start(self) -> None:
        await self.decode.start()
        await self.runtime.start()

    async def aclose(self) -> None:
        """After the server stopped: in-flight pushes, reservations and offers, then the data plane."""
        await self.decode.aclose()
        await self.prefill.aclose()
        if self.store:
            await self.store.aclose()
        await self.sender.close()
        await self.receiver.close()


async def serve(config: WorkerConfig) -> None:
    process = ElasticProcess(config)
    await process.decode.start()
    await process.runtime.run(on_shutdown=process.aclose)
