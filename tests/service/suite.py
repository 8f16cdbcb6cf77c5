"""A whole suite in this process: real gRPC servers on free ports, real UCX, SmolLM2."""
from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import grpc

from pdserve.common import model_loader
from pdserve.common.engine.engine import LLMEngine
from pdserve.common.worker_config import WorkerConfig
from pdserve.decode import serve as decode_serve
from pdserve.prefill import serve as prefill_serve
from pdserve.router.config import RouterConfig
from pdserve.router.serve import RouterRuntime
from pdserve.v1 import common_pb2 as pb
from pdserve.v1 import decode_pb2_grpc, prefill_pb2_grpc, router_pb2_grpc


class InProcessSuite:
    def __init__(self, router, decode, prefill):
        self.router, self.decode, self.prefill = router, decode, prefill
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{router.port}")
        self.stub = router_pb2_grpc.RouterStub(self.channel)

    def worker_stubs(self):
        out = [decode_pb2_grpc.DecodeStub(grpc.aio.insecure_channel(f"127.0.0.1:{self.decode[0].port}"))]
        if self.prefill:
            out.append(prefill_pb2_grpc.PrefillStub(grpc.aio.insecure_channel(f"127.0.0.1:{self.prefill[0].port}")))
        return out

    async def loads(self) -> list[pb.WorkerLoad]:
        return [(await s.GetLoad(pb.GetLoadRequest())).load for s in self.worker_stubs()]


@contextlib.asynccontextmanager
async def inprocess_suite(smollm2, mode: str = "disaggregated", **worker_kw) -> AsyncIterator[InProcessSuite]:
    ref, _, tokenizer = smollm2

    def engine_for(config: WorkerConfig) -> LLMEngine:
        model, _ = model_loader.load(ref)
        return LLMEngine(config.engine_config(), model, tokenizer, ref)

    base = dict(port=0, num_kv_blocks=256, max_num_batched_tokens=128, **worker_kw)
    dcfg = WorkerConfig(role="colocated" if mode == "colocated" else "decode", worker_id="decode-0", **base)
    decode_rt, decode_worker = decode_serve.build(dcfg, engine_for(dcfg))
    await decode_worker.start()
    await decode_rt.start()
    prefill = []
    if mode == "disaggregated":
        pcfg = WorkerConfig(role="prefill", worker_id="prefill-0", **base)
        prefill_rt, prefill_worker = prefill_serve.build(pcfg, engine_for(pcfg))
        await prefill_rt.start()
        prefill = [prefill_rt]
    rcfg = RouterConfig(port=0, mode=mode, decode_targets=[f"127.0.0.1:{decode_rt.port}"],
                        prefill_targets=[f"127.0.0.1:{rt.port}" for rt in prefill], load_poll_s=0.2)
    router = RouterRuntime(rcfg, tokenizer, 2048)
    await router.start(ready_timeout_s=30)
    suite = InProcessSuite(router, [decode_rt], prefill)
    try:
        yield suite
    finally:
        await suite.channel.close()
        await router.stop()
        for rt in [decode_rt, *prefill]:
            await rt.server.stop(grace=0)
            await rt.engine.stop()
        await decode_worker.stop()
        await decode_worker.receiver.close()
        if prefill:
            await prefill_worker.sender.close()
