"""The load generator against a real in-process suite (SmolLM2): what a short run reports."""

from __future__ import annotations

import pytest

from pdserve.bench import senders, workload
from pdserve.bench.loadgen import run_open, warm_up
from pdserve.bench.metrics import Slo, summarize
from pdserve.bench.workload import LengthDist
from pdserve.router.serve import load_tokenizer
from tests.service.suite import inprocess_suite
from tests.service.test_null_worker import null_suite

OUTPUT_TOKENS = 6


def colocated(smollm2):
    # One worker, no KV moves between processes: the loopback transport spares UCX's device setup.
    return inprocess_suite(smollm2, "colocated", transport="loopback")


def _requests(n: int = 4) -> list[workload.Request]:
    return workload.synthetic(
        n, 4.0, LengthDist.parse("uniform:16:40"), LengthDist.parse(f"fixed:{OUTPUT_TOKENS}"), seed=7
    )


def _check_run(records, requests) -> dict:
    s = summarize(records, Slo(ttft_ms=60_000, tpot_ms=5_000))
    assert s["errors"] == {} and s["completed"] == len(requests)
    assert s["ttft_ms"]["p50"] > 0 and s["itl_ms"]["p50"] > 0 and s["tpot_ms"]["p50"] > 0
    assert s["e2e_ms"]["p50"] >= s["ttft_ms"]["p50"]
    assert 0 < s["goodput_rps"] <= s["throughput_rps"]
    assert s["output_tokens_per_s"] == pytest.approx(s["throughput_rps"] * OUTPUT_TOKENS)
    for req, rec in zip(requests, records):
        assert rec.prompt_tokens == len(req.prompt) and rec.sent_s >= req.arrival_s
    return s


async def test_grpc_load_run_times_every_token_of_every_request(smollm2):
    requests = _requests()
    async with colocated(smollm2) as suite:
        send = senders.StubSender(f"127.0.0.1:{suite.router.port}", timeout_s=60)
        try:
            await warm_up(send, 1)
            records = await run_open(requests, send)
        finally:
            await send.close()
    _check_run(records, requests)
    assert all(r.output_tokens == OUTPUT_TOKENS and len(r.itls_ms) == OUTPUT_TOKENS - 1 for r in records)


async def test_http_load_run_reports_the_same_figures_through_the_openai_endpoint(smollm2):
    requests = _requests(3)
    async with colocated(smollm2) as suite:
        send = senders.HttpSender(f"http://127.0.0.1:{suite.router.http.port}", timeout_s=60)
        try:
            records = await run_open(requests, send)
        finally:
            await send.close()
    _check_run(records, requests)
    assert all(r.output_tokens == OUTPUT_TOKENS for r in records)  # from the usage chunk


async def test_a_refused_request_is_counted_by_its_status_code():
    too_long = workload.Request(0, 0.0, [500] * 9000, 4)  # past SmolLM2's 8,192-token context: the router refuses it
    async with null_suite(load_tokenizer("")) as (router, _):  # no model needed to be refused
        send = senders.StubSender(f"127.0.0.1:{router.port}", timeout_s=60)
        try:
            records = await run_open([too_long], send)
        finally:
            await send.close()
    s = summarize(records, Slo())
    assert s["errors"] == {"INVALID_ARGUMENT": 1} and s["completed"] == 0 and s["goodput_rps"] == 0
    assert s["ttft_ms"]["p50"] is None
