"""`pdserve serve prefill`: a prefill worker process."""

from __future__ import annotations

import dataclasses

from pdserve.common.kv.store_client import StoreClient
from pdserve.common.transfer.transport import make_receiver, make_sender
from pdserve.common.worker_config import WorkerConfig
from pdserve.common.worker_runtime import WorkerRuntime
from pdserve.prefill.servicer import PrefillServicer
from pdserve.prefill.worker import PrefillWorker
from pdserve.v1 import prefill_pb2_grpc


def add_prefill_worker(
    rt: WorkerRuntime, config: WorkerConfig, sender, store: StoreClient | None, gate=lambda: None
) -> PrefillWorker:
    """A PrefillWorker on the runtime's engine, served by the runtime's server (`gate`: elastic/role.py)."""
    worker = PrefillWorker(
        rt.engine,
        sender,
        max_queue=config.max_queue,
        store=store,
        worker_id=rt.worker_id,
        transfer_timeout_s=config.transfer_timeout_s,
        gate=gate,
    )
    prefill_pb2_grpc.add_PrefillServicer_to_server(PrefillServicer(worker, rt.load_response), rt.server)
    return worker


class PrefillProcess:
    """The runtime, the worker and the KV data plane it opened; `aclose` closes them."""

    def __init__(self, config: WorkerConfig, engine=None):
        config = dataclasses.replace(config, role="prefill")
        self.runtime = rt = WorkerRuntime(config, engine)
        self.sender = make_sender(config)
        self.receiver = self.store = None
        if config.kvstore:  # reads cached prefixes in, offers what it computed
            self.receiver = make_receiver(config)
            self.store = StoreClient(
                config.kvstore, self.receiver, self.sender, rt.engine.spec.fingerprint, security=config
            )
        self.worker = add_prefill_worker(rt, config, self.sender, self.store)

    async def start(self) -> None:
        await self.runtime.start()

    async def aclose(self) -> None:
        """After the server stopped: KV pushes in flight, then the data plane."""
        await self.worker.aclose()
        if self.store:
            await self.store.aclose()
            await self.receiver.close()
        await self.sender.close()


async def serve(config: WorkerConfig) -> None:
    process = PrefillProcess(config)
    await process.runtime.run(on_shutdown=process.aclose)
