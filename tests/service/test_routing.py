"""Cache- and load-aware routing, and the local-prefill decision, in a running suite."""

from __future__ import annotations

import asyncio
import collections

from pdserve.v1 import common_pb2 as pb
from pdserve.v1 import router_pb2 as rpb
from tests.engine.prompts import text_of_tokens
from tests.polling import settles
from tests.service.suite import inprocess_suite


def _request(ids, rid, max_tokens=4, **kw):
    return rpb.GenerateRequest(
        request_id=rid,
        token_ids=pb.TokenIds(ids=ids),
        sampling=pb.SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw),
    )


async def _last(stub, req):
    last = None
    async for r in stub.Generate(req):
        last = r
    return last


async def _as_identical(suite) -> None:
    """The workers are identical, but on a shared machine one warm-up can run while a neighbour
    is busy, and their measured speeds then differ by more than the policy's tolerances (seen
    here: 2x and more): give each the mean of all their measurements, and wait until the router
    sees it. What the policy makes of queues, caches and running streams is then what is tested."""
    engines = [rt.engine for rt in suite.decode + suite.prefill]
    tps = sum(e.prefill_tps_ewma for e in engines) / len(engines)
    step_ms = sum(e.step_ms_ewma for e in engines) / len(engines)
    for e in engines:
        e.prefill_tps_ewma = tps
        e.step_ms_ewma = step_ms
    pool = suite.router.pool
    assert await settles(
        lambda: all(w.load and abs(w.load.prefill_tokens_per_s - tps) <= 1e-3 * tps for w in pool.decode + pool.prefill)
    )


async def test_shared_prefixes_go_where_the_cache_is_and_load_stays_spread(smollm2):
    _, _, tokenizer = smollm2
    systems = [text_of_tokens(tokenizer, 320, offset=k) for k in range(3)]  # three shared system prompts
    async with inprocess_suite(smollm2, prefill_workers=2, warm_up=True) as suite:
        await _as_identical(suite)
        owner: dict[int, str] = {}
        per_worker = collections.Counter()
        hits = 0
        for round_ in range(4):
            for k, system in enumerate(systems):
                question = text_of_tokens(tokenizer, 12, offset=10 * round_ + k + 5)
                last = await _last(suite.stub, _request(system + question, f"{round_}-{k}"))
                worker = last.route.prefill_worker_id
                per_worker[worker] += 1
                if round_ == 0:
                    owner[k] = worker
                else:
                    assert worker == owner[k], f"prefix {k} moved from {owner[k]} to {worker}"
                    hits += last.usage.cached_tokens >= 320 // 16 * 16
        # Every repeat found its prefix cached on the worker it was sent to.
        assert hits == 9
        # Load spread bound: with 3 prefixes on 2 workers, no worker takes more than 2/3 of requests.
        assert len(per_worker) == 2 and max(per_worker.values()) <= 8


async def test_a_hot_prefix_overflows_to_the_other_worker_under_load(smollm2):
    _, _, tokenizer = smollm2
    system = text_of_tokens(tokenizer, 320)
    async with inprocess_suite(smollm2, prefill_workers=2, warm_up=True) as suite:
        await _as_identical(suite)
        await _last(suite.stub, _request(system + text_of_tokens(tokenizer, 8, offset=1), "warm"))
        burst = [
            _last(suite.stub, _request(system + text_of_tokens(tokenizer, 200, offset=i), f"b{i}")) for i in range(6)
        ]
        workers = collections.Counter(r.route.prefill_worker_id for r in await asyncio.gather(*burst))
        assert len(workers) == 2, workers  # the queue made the cold worker cheaper for some


async def test_local_prefill_when_idle_and_disaggregation_when_decode_is_busy(smollm2):
    _, _, tokenizer = smollm2
    async with inprocess_suite(smollm2, router_kw={"local_prefill": "auto"}, warm_up=True) as suite:
        await _as_identical(suite)
        short = await _last(suite.stub, _request(text_of_tokens(tokenizer, 24), "short"))
        assert not short.route.disaggregated  # idle: no hop beats a hop
        # Four streams far longer than the test needs (cancelled once the decision is made), so
        # that they still run when the router's view of the decode worker shows them, on any machine.
        streams = [
            asyncio.create_task(
                _last(
                    suite.stub,
                    _request(text_of_tokens(tokenizer, 16, offset=i), f"bg{i}", max_tokens=400, ignore_eos=True),
                )
            )
            for i in range(4)
        ]
        assert await settles(lambda: suite.router.pool.decode[0].load.running_seqs >= 4, timeout=60)
        long = await _last(suite.stub, _request(text_of_tokens(tokenizer, 1000, offset=9), "long"))
        assert long.route.disaggregated  # a local prefill would stall four streams
        for s in streams:
            s.cancel()
        await asyncio.gather(*streams, return_exceptions=True)
        decisions = suite.router.router.decisions
        # Every request was decided and counted (the later background streams may
        # already see a busy decode worker and disaggregate: that is the policy too).
        assert decisions["local_prefill"] >= 1 and decisions["disaggregated"] >= 1
        assert sum(decisions.values()) == 6
