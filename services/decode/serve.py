"""`pdserve serve decode`: a decode (or colocated) worker process."""

from __future__ import annotations

from pdserve.common.kv.store_client import StoreClient
from pdserve.common.transfer.transport import make_receiver, make_sender
from pdserve.common.worker_config import WorkerConfig
from pdserve.common.worker_runtime import WorkerRuntime
from pdserve.decode.servicer import DecodeServicer
from pdserve.decode.worker import DecodeWorker
from pdserve.v1 import decode_pb2_grpc


def add_decode_worker(
    rt: WorkerRuntime, config: WorkerConfig, receiver, store: StoreClient | None, gate=lambda: None
) -> DecodeWorker:
    """A DecodeWorker on the runtime's engine, served by the runtime's server (`gate`: elastic/role.py)."""
    worker = DecodeWorker(
        rt.engine,
        receiver,
        lease_s=config.lease_ms / 1000,
        transfer_timeout_s=config.transfer_timeout_s,
        max_queue=config.max_queue,
        store=store,
        worker_id=rt.worker_id,
        gate=gate,
    )
    decode_pb2_grpc.add_DecodeServicer_to_server(DecodeServicer(worker, rt.load_response), rt.server)
    return worker


class DecodeProcess:
    """The runtime, the worker and the KV data plane it opened; `aclose` closes them."""

    def __init__(self, config: WorkerConfig, engine=None):
        self.runtime = rt = WorkerRuntime(config, engine)
        self.receiver = make_receiver(config)
        self.sender = self.store = None
        if config.kvstore:  # reads prefixes in; writes back what it prefilled itself (local or colocated requests)
            self.sender = make_sender(config)
            self.store = StoreClient(
                config.kvstore, self.receiver, self.sender, rt.engine.spec.fingerprint, security=config
            )
        self.worker = add_decode_worker(rt, config, self.receiver, self.store)

    async def start(self) -> None:
        await self.worker.start()
        await self.runtime.start()

    async def aclose(self) -> None:
        """After the server stopped: reservations and offers in flight, then the data plane."""
        await self.worker.aclose()
        if self.store:
            await self.store.aclose()
            await self.sender.close()
        await self.receiver.close()


async def serve(config: WorkerConfig) -> None:
    process = DecodeProcess(config)
    await process.worker.start()
    await process.runtime.run(on_shutdown=process.aclose)
