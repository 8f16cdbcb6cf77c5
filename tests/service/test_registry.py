"""Workers register with the router, heartbeat, and leave (or are dropped when silent)."""

from __future__ import annotations

import asyncio

import grpc

from pdserve.common import model_loader
from pdserve.common.engine.engine import LLMEngine
from pdserve.common.worker_config import WorkerConfig
from pdserve.decode import serve as decode_serve
from pdserve.prefill import serve as prefill_serve
from pdserve.router.config import RouterConfig
from pdserve.router.serve import RouterRuntime
from pdserve.v1 import common_pb2 as pb
from pdserve.v1 import router_pb2 as rpb
from pdserve.v1 import router_pb2_grpc


async def _worker(process_type, smollm2, router_port: int, **kw):
    ref, _, tokenizer = smollm2
    cfg = WorkerConfig(port=0, num_kv_blocks=128, router=[f"127.0.0.1:{router_port}"], **kw)
    model, _ = model_loader.load(ref)
    process = process_type(cfg, LLMEngine(cfg.engine_config(), model, tokenizer, ref))
    await process.start()
    return process.runtime


async def _listed(stub) -> list[str]:
    return sorted(w.info.worker_id for w in (await stub.ListWorkers(rpb.ListWorkersRequest())).workers)


async def test_workers_register_serve_and_leave(smollm2):
    _, _, tokenizer = smollm2
    router = RouterRuntime(
        RouterConfig(port=0, http_port=-1, load_poll_s=0.2, worker_lease_s=1.5, local_prefill="never"), tokenizer, 2048
    )
    starting = asyncio.create_task(router.start(ready_timeout_s=60))  # ready once workers have registered
    decode = await _worker(decode_serve.DecodeProcess, smollm2, router.port, worker_id="d0")
    prefill = await _worker(prefill_serve.PrefillProcess, smollm2, router.port, worker_id="p0", role="prefill")
    await starting
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{router.port}")
    stub = router_pb2_grpc.RouterStub(channel)
    try:
        assert await _listed(stub) == ["d0", "p0"]
        stream = stub.Generate(
            rpb.GenerateRequest(
                token_ids=pb.TokenIds(ids=list(range(100, 140))),
                sampling=pb.SamplingParams(max_tokens=4, temperature=0),
            )
        )
        last = [r async for r in stream][-1]
        assert last.route.prefill_worker_id == "p0" and last.route.decode_worker_id == "d0"

        await prefill.registration.stop()  # a graceful leave: gone at once
        assert await _listed(stub) == ["d0"]

        decode.registration._task.cancel()  # a silent death: heartbeats stop
        await decode.server.stop(grace=0)
        for _ in range(50):
            await asyncio.sleep(0.2)
            if not await _listed(stub):
                break
        assert await _listed(stub) == []
    finally:
        await channel.close()
        await router.stop()
        for rt in (decode, prefill):
            await rt.server.stop(grace=0)
            await rt.engine.stop()


async def test_a_stream_on_a_registered_worker_dropped_as_silent_goes_on_on_another(smollm2, monkeypatch):
    """A registered worker that stops answering (heartbeats, load polls, steps: a frozen process) is
    dropped after its lease and its channel closed at once: the calls in flight on it end cancelled
    (locally, with no status), and are retried elsewhere, not the end of the client's stream."""
    from pdserve.decode.servicer import DecodeServicer

    frozen_engines: set = set()
    get_load = DecodeServicer.GetLoad

    async def unanswered(self, request, context):  # a frozen process answers no poll
        if self.worker.engine in frozen_engines:
            await asyncio.sleep(3600)
        return await get_load(self, request, context)

    monkeypatch.setattr(DecodeServicer, "GetLoad", unanswered)
    _, _, tokenizer = smollm2
    router = RouterRuntime(
        RouterConfig(port=0, http_port=-1, mode="colocated", load_poll_s=0.2, worker_lease_s=1.0), tokenizer, 2048
    )
    starting = asyncio.create_task(router.start(ready_timeout_s=60))
    workers = {
        name: await _worker(decode_serve.DecodeProcess, smollm2, router.port, worker_id=name, role="colocated")
        for name in ("c0", "c1")
    }
    await starting
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{router.port}")
    stub = router_pb2_grpc.RouterStub(channel)
    request = rpb.GenerateRequest(
        token_ids=pb.TokenIds(ids=list(range(100, 140))),
        sampling=pb.SamplingParams(max_tokens=48, temperature=0, ignore_eos=True),
    )
    frozen = None
    try:
        unfaulted = [t for r in [r async for r in stub.Generate(request)] for t in r.token_ids]
        tokens: list[int] = []
        async with asyncio.timeout(60):
            async for r in stub.Generate(request):
                tokens += r.token_ids
                if frozen is None and len(tokens) >= 4:  # its worker freezes: no heartbeat, no poll, no step
                    name = next(n for n, w in workers.items() if w.engine.engine.stats().running)
                    frozen = workers[name]
                    frozen.registration._task.cancel()
                    frozen_engines.add(frozen.engine)
                    await frozen.engine._lock.acquire()
                last = r
        assert tokens == unfaulted and last.finish_reason == pb.FINISH_REASON_LENGTH
        assert last.route.decode_worker_id != name
    finally:
        if frozen is not None and frozen.engine._lock.locked():
            frozen.engine._lock.release()
        await channel.close()
        await router.stop()
        for rt in workers.values():
            await rt.server.stop(grace=0)
            await rt.engine.stop()
