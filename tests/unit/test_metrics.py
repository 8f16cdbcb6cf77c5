"""pdserve.common.metrics through the real Prometheus exporter, and the router's request measurements.

The meter provider is process-wide, so the recording runs in a fresh Python
process that serves /metrics on a free port; the test scrapes it over HTTP and
reads the samples with prometheus_client's own parser.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from pdserve.common import metrics
from pdserve.router.request_metrics import RequestMetrics

SCRIPT = textwrap.dedent("""
    import asyncio, collections, json, sys, time, urllib.request
    import torch
    from prometheus_client.parser import text_string_to_metric_families
    from pdserve.common import metrics
    from pdserve.common.engine.outputs import EngineStats
    from pdserve.common.engine.sequence import FinishReason
    from pdserve.common.errors import CapacityExhaustedError, InvalidRequestError, TransferFailedError
    from pdserve.common.records import Route, Usage
    from pdserve.common.transfer import LoopbackKVReceiver, LoopbackKVSender
    from pdserve.kvstore.store import BlockStore
    from pdserve.router.request_metrics import RequestMetrics
    from pdserve.router.router import Event, Router
    from pdserve.router.worker_pool import WorkerPool

    port = metrics.serve_prometheus("127.0.0.1", 0, service="test")

    async def finished_stream():
        # first token after 50 ms, then one token every 20 ms, then two tokens at once
        for i, delay in enumerate((0.05, 0.02, 0.02, 0.02)):
            await asyncio.sleep(delay)
            yield Event("r1", [i], "w")
        await asyncio.sleep(0.02)
        yield Event("r1", [7, 8], "ww", FinishReason.STOP)  # the last tokens say it ended...
        summary = Event("r1", [], "", FinishReason.STOP, Usage(10, 6, 0), {}, Route("prefill-0", "decode-0", True))
        yield summary

    async def refused_stream():
        raise CapacityExhaustedError("full")
        yield

    async def main():
        # TTFT objective an hour, TPOT 1 ms: met and missed on any machine (TTFT 50 ms, TPOT >= 16 ms).
        observe = RequestMetrics(slo_ttft_ms=3_600_000, slo_tpot_ms=1).observe
        genai = {"gen_ai.operation.name": "chat", "gen_ai.request.model": "m"}
        t0 = time.perf_counter()
        async for _ in observe(finished_stream(), genai):
            pass
        finished_s = time.perf_counter() - t0  # the stream's whole life: an upper bound on its timings
        try:
            async for _ in observe(refused_stream()):
                pass
        except CapacityExhaustedError:
            pass
        try:
            with RequestMetrics.refusals():  # refused before it was taken
                raise InvalidRequestError("temperature", "must be a number")
        except InvalidRequestError:
            pass
        events = observe(finished_stream())
        await anext(events)
        await events.aclose()  # the client went away after one token

        blocks = [torch.zeros(64, dtype=torch.uint8) for _ in range(3)]
        rx, tx, corrupting = LoopbackKVReceiver(), LoopbackKVSender(), LoopbackKVSender(corrupt_blocks=frozenset({0}))
        ticket = rx.expect("t1", blocks[:2])
        await tx.send(ticket, 0, [torch.ones(64, dtype=torch.uint8)] * 2)  # 128 bytes
        bad = rx.expect("t2", blocks[2:])
        await corrupting.send(bad, 0, [torch.ones(64, dtype=torch.uint8)])  # lands corrupted: the receiver fails it
        lost = rx.expect("t3", blocks[:1])
        try:
            await rx.wait("t3", timeout=0.01)
        except TransferFailedError:
            pass
        return finished_s

    finished_s = asyncio.run(main())

    class Engine:
        def stats(self):
            return EngineStats(running=3, waiting=5, free_blocks=60, total_blocks=100, reserved=0, held=0,
                               prefix_queries=40, prefix_hits=30, computed_tokens=0, preemptions=1)
    engine, store = Engine(), BlockStore(8, 16)
    store.lookup(b"f", [b"a", b"b"])
    tokenizer = type("T", (), {"__len__": lambda self: 10, "get_vocab": lambda self: {}})()
    router = Router(tokenizer, WorkerPool(), mode="disaggregated", max_model_len=64)
    router.decisions.update(disaggregated=4, local_prefill=2)
    router.recoveries.update(decode=3, gave_up=1)
    metrics.PAIRS_SKIPPED.add(2, {"reason": "kv_wire_version"})  # router.plan.choose's count
    metrics.ROLE_SWITCHES.add(1, {"from": "prefill", "to": "decode", "reason": "balancer"})  # router.roles
    labels = {"worker_id": "decode-0", "role": "prefill"}
    metrics.watch_engine(engine, labels)
    labels["role"] = "decode"  # an elastic worker, switched before the scrape
    metrics.watch_store(store)
    metrics.watch_router(router)

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples = [(s.name, {k: v for k, v in s.labels.items() if not k.startswith("otel_")}, s.value)
               for family in text_string_to_metric_families(text) for s in family.samples
               if s.name.startswith(("pdserve_", "gen_ai_"))]
    json.dump({"samples": samples, "finished_s": finished_s}, sys.stdout)
""")


@pytest.fixture(scope="module")
def scraped() -> dict:
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def samples(scraped) -> list[tuple[str, dict, float]]:
    return [tuple(s) for s in scraped["samples"]]


def value(samples, name: str, **labels) -> float:
    found = [v for n, ls, v in samples if n == name and labels.items() <= ls.items()]
    assert len(found) == 1, (name, labels, [s for s in samples if s[0] == name])
    return found[0]


def test_every_declared_series_is_exported_under_its_declared_name(samples):
    names = {n for n, _, _ in samples}
    assert len(metrics.SERIES) >= 20
    for series in metrics.SERIES:
        assert series in names or f"{series}_count" in names, f"{series} not in {sorted(names)}"


def test_a_finished_request_records_ttft_itl_tpot_e2e_outcome_and_route(samples, scraped):
    # The finished request (with GenAI attributes) and the one cancelled after its first token.
    assert (
        value(
            samples,
            "gen_ai_server_time_to_first_token_seconds_count",
            gen_ai_operation_name="chat",
            gen_ai_request_model="m",
        )
        == 1
    )
    assert sum(v for n, _, v in samples if n == "gen_ai_server_time_to_first_token_seconds_count") == 2
    # 6 tokens: 5 gaps, the last event's two tokens split its gap in two
    assert value(samples, "pdserve_inter_token_latency_seconds_count") == 5
    assert value(samples, "pdserve_inter_token_latency_seconds_bucket", le="0.005") == 0
    assert value(samples, "gen_ai_server_time_per_output_token_seconds_count", gen_ai_request_model="m") == 1
    tpot = value(samples, "gen_ai_server_time_per_output_token_seconds_sum")
    # (last - first) / 5: four 20 ms steps at least, the stream's whole life at most (longer when busy)
    assert 0.015 <= tpot <= scraped["finished_s"] / 5
    # Recorded once, though two events of the stream carry a finish reason.
    assert value(samples, "gen_ai_server_request_duration_seconds_count", gen_ai_operation_name="chat") == 1
    duration = value(samples, "gen_ai_server_request_duration_seconds_sum", gen_ai_operation_name="chat")
    assert 0.13 <= duration <= scraped["finished_s"]  # the sleeps at least
    assert value(samples, "pdserve_routed_requests_total", role="prefill", worker_id="prefill-0") == 1
    assert value(samples, "pdserve_routed_requests_total", role="decode", worker_id="decode-0") == 1


def test_a_failed_or_cancelled_request_records_its_duration_with_its_error_type(samples):
    assert value(samples, "gen_ai_server_request_duration_seconds_count", error_type="resource_exhausted") == 1
    assert value(samples, "gen_ai_server_request_duration_seconds_count", error_type="cancelled") == 1
    assert value(samples, "gen_ai_server_request_duration_seconds_count", gen_ai_operation_name="chat") == 1


def test_outcomes_count_finish_reasons_errors_and_cancels(samples):
    assert value(samples, "pdserve_requests_total", outcome="stop") == 1
    assert value(samples, "pdserve_requests_total", outcome="resource_exhausted") == 1
    assert value(samples, "pdserve_requests_total", outcome="cancelled") == 1
    assert value(samples, "pdserve_requests_total", outcome="invalid_argument") == 1  # refused before it was taken
    # ... with no duration: a refusal would pull the latency quantiles down as the system fails.
    assert not [
        s
        for s in samples
        if s[0].startswith("gen_ai_server_request_duration") and s[1].get("error_type") == "invalid_argument"
    ]


def test_slo_attainment_is_counted_per_objective_and_a_failed_request_misses_both(samples):
    # the finished request met TTFT (<= an hour) and missed TPOT (16+ ms > 1 ms); the one refused at
    # capacity missed both; the one cancelled after its first token met TTFT, and its TPOT is unknown
    assert value(samples, "pdserve_slo_requests_total", objective="ttft", attained="true") == 2
    assert value(samples, "pdserve_slo_requests_total", objective="ttft", attained="false") == 1
    assert value(samples, "pdserve_slo_requests_total", objective="tpot", attained="false") == 2
    assert not [
        s for s in samples if s[0] == "pdserve_slo_requests_total" and s[1] == {"objective": "tpot", "attained": "true"}
    ]


@pytest.mark.parametrize(
    "outcome, ttft_s, tpot_s, waited_s, scored",
    [
        ("stop", 0.5, 0.05, 3.0, {"ttft": True, "tpot": True}),
        ("length", 2.0, 0.2, 9.0, {"ttft": False, "tpot": False}),
        ("stop", 0.5, None, 0.5, {"ttft": True}),  # one token: no TPOT
        ("resource_exhausted", None, None, 0.01, {"ttft": False, "tpot": False}),  # shed: missed, not left out
        ("unavailable", 0.5, None, 4.0, {"ttft": True, "tpot": False}),  # failed mid-stream
        ("deadline_exceeded", None, None, 30.0, {"ttft": False}),  # its client's deadline: as a cancel
        ("deadline_exceeded", None, None, 0.3, {}),  # ... before the objective passed: unknown
        ("cancelled", 0.5, None, 2.0, {"ttft": True}),  # its client left after a token
        ("cancelled", None, None, 0.2, {}),  # its client left before the objective passed: unknown
        ("cancelled", None, None, 1.5, {"ttft": False}),  # ... after it passed with no token
        ("abort", None, None, 1.5, {"ttft": False}),
        ("invalid_argument", None, None, 0.01, {}),  # its own input: as a refusal, not scored
    ],
)
def test_each_objective_is_scored_once_its_result_is_known(outcome, ttft_s, tpot_s, waited_s, scored):
    slo = RequestMetrics(slo_ttft_ms=1000, slo_tpot_ms=100)
    assert slo.scores(outcome, ttft_s, tpot_s, waited_s) == scored
    assert RequestMetrics(slo_ttft_ms=1000).scores(outcome, ttft_s, tpot_s, waited_s) == {
        k: v for k, v in scored.items() if k == "ttft"
    }  # an objective set to 0 is never scored


def test_transfers_count_bytes_and_failures_on_each_side(samples):
    assert value(samples, "pdserve_kv_transfer_bytes_total", transport="loopback") == 3 * 64  # every send
    assert value(samples, "pdserve_kv_transfer_duration_seconds_count", transport="loopback") == 2
    assert value(samples, "pdserve_kv_transfer_failures_total", side="receive", reason="failed") == 1
    assert value(samples, "pdserve_kv_transfer_failures_total", side="receive", reason="timeout") == 1


def test_engine_store_and_router_state_is_read_at_scrape_time(samples):
    # under the role the worker has then: the engine was watched as prefill, then switched
    worker = {"worker_id": "decode-0", "role": "decode"}
    assert value(samples, "pdserve_queue_depth", **worker) == 5
    assert value(samples, "pdserve_running_sequences", **worker) == 3
    assert value(samples, "pdserve_kv_blocks_used", **worker) == 40
    assert value(samples, "pdserve_kv_blocks_capacity", **worker) == 100
    assert value(samples, "pdserve_prefix_cache_queried_tokens_total", **worker) == 40
    assert value(samples, "pdserve_prefix_cache_hit_tokens_total", **worker) == 30
    assert value(samples, "pdserve_kv_blocks_capacity", role="kvstore") == 8
    assert value(samples, "pdserve_kvstore_lookup_blocks_total", result="miss") == 2
    assert value(samples, "pdserve_prefill_decisions_total", decision="disaggregated") == 4
    assert value(samples, "pdserve_prefill_decisions_total", decision="local_prefill") == 2
    assert value(samples, "pdserve_router_inflight_requests") == 0
    assert value(samples, "pdserve_router_recoveries_total", phase="decode") == 3
    assert value(samples, "pdserve_router_recoveries_total", phase="gave_up") == 1
    assert value(samples, "pdserve_router_recoveries_total", phase="prefill") == 0


def test_metrics_port_minus_one_serves_nothing():
    assert metrics.serve_prometheus("127.0.0.1", -1, service="test") is None


def test_tokens_count_prompts_of_finished_requests_and_every_token_streamed(samples):
    assert value(samples, "pdserve_tokens_total", type="prompt") == 10
    assert value(samples, "pdserve_tokens_total", type="cached") == 0
    assert value(samples, "pdserve_tokens_total", type="generation") == 6 + 1  # the cancelled one's first too
