"""`pdserve serve prefill`: a prefill worker process."""
from __future__ import annotations

import dataclasses

from pdserve.common.worker_config import WorkerConfig
from pdserve.common.kv.store_client import StoreClient
from pdserve.common.transfer.transport import make_receiver, make_sender
from pdserve.common.worker_runtime import WorkerRuntime
from pdserve.prefill.servicer import PrefillServicer
from pdserve.prefill.worker import PrefillWorker
from pdserve.v1 import prefill_pb2_grpc


def build(config: WorkerConfig, engine=None) -> tuple[WorkerRuntime, PrefillWorker]:
    config = dataclasses.replace(config, role="prefill")
    rt = WorkerRuntime(config, engine)
    sender = make_sender(config)
    store = None
    if config.kvstore:
        store = StoreClient(config.kvstore, make_receiver(config), sender,
                            rt.engine.engine.spec.fingerprint, security=config)
    worker = PrefillWorker(rt.engine, sender, max_queue=config.max_queue, store=store, worker_id=rt.worker_id,
                           transfer_timeout_s=config.transfer_timeout_s)
    prefill_pb2_grpc.add_PrefillServicer_to_server(PrefillServicer(worker, rt.load_response), rt.server)
    return rt, worker


async def serve(config: WorkerConfig) -> None:
    rt, worker = build(config)

    async def shutdown() -> None:
        await worker.drain()
        if worker.store:
            await worker.store.close()
            await worker.store.receiver.close()
        await worker.sender.close()

    await rt.run(on_shutdown=shutdown)
