"""A worker runtime that is dropped lets its engine go: the process-wide metrics registry holds
engines weakly, and nothing it keeps (a worker's labels) may hold one strongly. An embedded
worker, and every in-process suite of the tests, would otherwise keep its KV pool for ever."""

from __future__ import annotations

import gc
import weakref

from pdserve.common.worker_config import WorkerConfig
from pdserve.common.worker_runtime import WorkerRuntime


async def test_a_dropped_worker_runtime_lets_its_engine_be_collected(tiny_model_dir):  # grpc.aio needs a loop
    config = WorkerConfig(model=str(tiny_model_dir), port=0, num_kv_blocks=16, warm_up=False)
    runtime = WorkerRuntime(config)
    runtime.set_role("decode", 1)  # an elastic worker's role, in the metrics' labels
    engine = weakref.ref(runtime.engine)
    del runtime
    gc.collect()
    assert engine() is None, [type(r).__name__ for r in gc.get_referrers(engine())]
