"""`pdserve serve decode`: a decode (or colocated) worker process."""
from __future__ import annotations

from pdserve.common.kv.store_client import StoreClient
from pdserve.common.worker_config import WorkerConfig
from pdserve.common.transfer.transport import make_receiver, make_sender
from pdserve.common.worker_runtime import WorkerRuntime
from pdserve.decode.servicer import DecodeServicer
from pdserve.decode.worker import DecodeWorker
from pdserve.v1 import decode_pb2_grpc


def build(config: WorkerConfig, engine=None) -> tuple[WorkerRuntime, DecodeWorker]:
    rt = WorkerRuntime(config, engine)
    receiver = make_receiver(config)
    store = None
    if config.kvstore:  # reads prefixes in; writes back what it prefilled itself (local or colocated requests)
        store = StoreClient(config.kvstore, receiver, make_sender(config),
                            rt.engine.engine.spec.fingerprint, security=config)
    worker = DecodeWorker(rt.engine, receiver, lease_s=config.lease_ms / 1000,
                          transfer_timeout_s=config.transfer_timeout_s, max_queue=config.max_queue, store=store,
                          worker_id=rt.worker_id)
    decode_pb2_grpc.add_DecodeServicer_to_server(DecodeServicer(worker, rt.load_response), rt.server)
    return rt, worker


async def serve(config: WorkerConfig) -> None:
    rt, worker = build(config)
    await worker.start()

    async def shutdown() -> None:
        await worker.stop()  # after the offers in flight
        if worker.store:
            await worker.store.close()
            await worker.store.sender.close()
        await worker.receiver.close()

    await rt.run(on_shutdown=shutdown)
