"""A whole suite in this process: real gRPC servers on free ports, real UCX, SmolLM2."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator

from pdserve.common import model_loader
from pdserve.common.engine.engine import LLMEngine
from pdserve.common.security import SecurityConfig
from pdserve.common.server import add_health_service
from pdserve.common.worker_config import WorkerConfig
from pdserve.decode import serve as decode_serve
from pdserve.elastic.serve import ElasticProcess
from pdserve.kvstore import serve as kvstore_serve
from pdserve.kvstore.config import KVStoreConfig
from pdserve.prefill import serve as prefill_serve
from pdserve.router.config import RouterConfig
from pdserve.router.serve import RouterRuntime
from pdserve.v1 import common_pb2 as pb
from pdserve.v1 import decode_pb2_grpc, kvstore_pb2, kvstore_pb2_grpc, prefill_pb2_grpc, router_pb2_grpc
from tests.polling import settles


class InProcessSuite:
    def __init__(self, router, decode, prefill, store_port, security: SecurityConfig | None = None, decode_workers=()):
        self.router, self.decode, self.prefill, self.store_port = router, decode, prefill, store_port
        self.decode_workers = list(decode_workers)  # DecodeWorker, beside each runtime in `decode`
        # The test's own channels carry the services' credentials (cert, internal token).
        self.security = security or SecurityConfig()
        self.channel = self.security.dial(f"127.0.0.1:{router.port}")
        self.stub = router_pb2_grpc.RouterStub(self.channel)
        self.store_stub = None
        if store_port:
            self.store_stub = kvstore_pb2_grpc.KVStoreStub(self.security.dial(f"127.0.0.1:{store_port}"))

    def worker_stubs(self):
        dial = self.security.dial
        out = [decode_pb2_grpc.DecodeStub(dial(f"127.0.0.1:{rt.port}")) for rt in self.decode]
        out += [prefill_pb2_grpc.PrefillStub(dial(f"127.0.0.1:{rt.port}")) for rt in self.prefill]
        return out

    async def loads(self) -> list[pb.WorkerLoad]:
        return [(await s.GetLoad(pb.GetLoadRequest())).load for s in self.worker_stubs()]

    async def store_stats(self) -> kvstore_pb2.GetStoreStatsResponse:
        return await self.store_stub.GetStats(kvstore_pb2.GetStoreStatsRequest())


async def pools_full(suite: InProcessSuite, dead: set[str] = frozenset(), timeout: float = 10.0) -> None:
    """Every surviving worker's pool is back to all free, and the router has nothing in
    flight: no reservation, hold or block left. Frees are asynchronous (cancels reaching
    the workers, finishing sends), so this polls until `timeout`."""

    def stats():
        return [rt.engine.stats() for rt in suite.decode + suite.prefill if rt.worker_id not in dead]

    def full() -> bool:
        return suite.router.router.inflight == 0 and all(
            s.free_blocks == s.total_blocks and s.reserved == s.held == s.running == s.waiting == 0 for s in stats()
        )

    if not await settles(full, timeout):
        raise AssertionError(
            f"blocks still in use after {timeout} s (router: {suite.router.router.inflight} in flight): {stats()}"
        )


async def _stop(process) -> None:
    """A worker process's parts, as its own shutdown stops them (the server first)."""
    await process.runtime.server.stop(grace=0)
    await process.aclose()
    await process.runtime.engine.stop()


@contextlib.asynccontextmanager
async def inprocess_suite(
    smollm2,
    mode: str = "disaggregated",
    *,
    prefill_workers: int = 1,
    decode_workers: int = 1,
    store_blocks: int = 0,
    prefill_kw: dict | None = None,
    decode_kw: dict | None = None,
    router_kw: dict | None = None,
    security: dict | None = None,
    elastic: tuple[str, ...] = (),
    **worker_kw,
) -> AsyncIterator[InProcessSuite]:
    """store_blocks > 0 adds a KV store of that many blocks (used by the prefill workers,
    and by the decode worker if decode_kw has use_store=True); prefill_kw, decode_kw and
    router_kw override settings. The router always disaggregates unless router_kw says otherwise.
    `security`: SecurityConfig settings (tls_*, internal_token) given to every service.
    `elastic`: the first roles of elastic workers (`elastic-0`, ...) added to the others."""
    security = security or {}
    ref, _, tokenizer = smollm2

    def engine_for(config: WorkerConfig) -> LLMEngine:
        model, _ = model_loader.load(ref, device=config.device, dtype=config.dtype)
        return LLMEngine(config.engine_config(), model, tokenizer, ref)

    stack = contextlib.AsyncExitStack()
    store_port = 0
    if store_blocks:
        scfg = KVStoreConfig(
            port=0,
            capacity_blocks=store_blocks,
            model=str(ref.path),
            dtype=worker_kw.get("dtype", "float32"),
            **security,
        )
        server, store_port, store = kvstore_serve.build(scfg)
        await add_health_service(server)
        await store.start()
        await server.start()

        async def stop_store():
            await server.stop(grace=0)
            await store.aclose()

        stack.push_async_callback(stop_store)

    # No warm-up unless asked (worker_kw warm_up=True): it seeds the cost model, which only
    # routing tests read, and costs ~3 s a worker.
    # float32 unless asked: tests compare tokens with transformers' float32 greedy continuation.
    base = {
        "port": 0,
        "num_kv_blocks": 256,
        "max_num_batched_tokens": 128,
        "warm_up": False,
        "dtype": "float32",
        **security,
        **worker_kw,
    }
    decode_kw = dict(decode_kw or {})
    if decode_kw.pop("use_store", False):
        decode_kw["kvstore"] = f"127.0.0.1:{store_port}"
    decode, decoders = [], []
    for i in range(decode_workers):
        dcfg = WorkerConfig(role="colocated" if mode == "colocated" else "decode", worker_id=f"decode-{i}", **base)
        dcfg = dataclasses.replace(dcfg, **decode_kw)
        process = decode_serve.DecodeProcess(dcfg, engine_for(dcfg))
        await process.start()
        decode.append(process.runtime)
        decoders.append(process.worker)
        stack.push_async_callback(_stop, process)

    prefill = []
    if mode == "disaggregated":
        for i in range(prefill_workers):
            pcfg = WorkerConfig(
                role="prefill",
                worker_id=f"prefill-{i}",
                kvstore=f"127.0.0.1:{store_port}" if store_port else "",
                **base,
            )
            pcfg = dataclasses.replace(pcfg, **(prefill_kw or {}))
            process = prefill_serve.PrefillProcess(pcfg, engine_for(pcfg))
            await process.start()
            prefill.append(process.runtime)
            stack.push_async_callback(_stop, process)

    targets = {
        "prefill": [f"127.0.0.1:{rt.port}" for rt in prefill],
        "decode": [f"127.0.0.1:{rt.port}" for rt in decode],
    }
    for i, role in enumerate(elastic):
        ecfg = WorkerConfig(role=role, worker_id=f"elastic-{i}", **base)
        process = ElasticProcess(ecfg, engine_for(ecfg))
        await process.start()
        (prefill if role == "prefill" else decode).append(process.runtime)
        targets["prefill" if role == "prefill" else "decode"].append(f"127.0.0.1:{process.runtime.port}")
        stack.push_async_callback(_stop, process)

    rcfg = RouterConfig(
        mode=mode,
        decode_targets=targets["decode"],
        prefill_targets=targets["prefill"],
        load_poll_s=0.2,
        **{"port": 0, "http_port": 0, "local_prefill": "never", **security, **(router_kw or {})},
    )
    router = RouterRuntime(rcfg, tokenizer, 2048)
    await router.start(ready_timeout_s=30)
    stack.push_async_callback(router.stop)
    suite = InProcessSuite(router, decode, prefill, store_port, SecurityConfig(**security), decoders)
    stack.push_async_callback(suite.channel.close)
    async with stack:
        yield suite
