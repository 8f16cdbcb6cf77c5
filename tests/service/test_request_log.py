"""The router's INFO line per request, from a real router in front of the null
engine, is the line docs/observability.md shows: same fields, in text and JSON."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
from pathlib import Path

from pdserve.client import AsyncClient
from pdserve.client.errors import PdserveClientError
from pdserve.common import logs
from tests.service.test_null_worker import null_suite, tokenizer  # noqa: F401  (fixtures)

DOC = Path(__file__).parents[2] / "docs" / "observability.md"


def documented_line() -> str:
    """The example `request finished` text line in docs/observability.md (a disaggregated suite, untraced)."""
    (line,) = [s for s in DOC.read_text().splitlines() if " INFO pdserve.router" in s and "request finished" in s]
    return line


def fields(text_line: str) -> dict[str, str]:
    tail = re.search(r"\[([^\]]*)\]$", text_line).group(1)
    return dict(kv.split("=", 1) for kv in tail.split())


async def one_logged_request(
    tokenizer,  # noqa: F811  (the fixture)
    fmt: str,
    prompt=(1000, 1001, 1002),
    says="request finished",
    request_id="doc-1",
) -> list[str]:
    stream = io.StringIO()
    logger = logging.getLogger("pdserve.router.request_metrics")
    handler = logs.make_handler(fmt, service="router", stream=stream)
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)  # setLevel, not .level =: it clears the loggers' isEnabledFor caches
    try:
        async with null_suite(tokenizer) as (router, _), AsyncClient(f"127.0.0.1:{router.port}") as client:
            with contextlib.suppress(PdserveClientError):
                await client.complete(list(prompt), max_tokens=4, request_id=request_id)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return [line for line in stream.getvalue().splitlines() if says in line]


async def test_the_request_finished_text_line_has_the_documented_counts_and_timings(tokenizer):  # noqa: F811
    (line,) = await one_logged_request(tokenizer, "text")
    assert " INFO pdserve.router.request_metrics: request finished: length [" in line
    got = fields(line)
    # The doc's line is a disaggregated request; the null engine is colocated (trace_id: where traced).
    assert list(got) == [k for k in fields(documented_line()) if k not in ("prefill_worker", "trace_id")]
    assert got["request_id"] == "doc-1" and got["decode_worker"] == "null-0"
    assert (got["prompt_tokens"], got["output_tokens"], got["cached_tokens"]) == ("3", "4", "0")
    assert all(float(got[k]) > 0 for k in ("ttft_ms", "tpot_ms", "duration_ms"))


async def test_the_request_finished_json_line_has_the_same_fields(tokenizer):  # noqa: F811
    (line,) = await one_logged_request(tokenizer, "json")
    record = json.loads(line)
    assert record["message"] == "request finished: length" and record["request_id"] == "doc-1"
    assert set(fields(documented_line())) - {"trace_id"} <= set(record)  # prefill_worker: "" here


async def test_a_request_refused_before_its_first_token_is_logged_with_its_id(tokenizer):  # noqa: F811
    # Its id is the router's own when the client gave none: then only the router knows it.
    (line,) = await one_logged_request(tokenizer, "json", [1000] * 100_000, "request ended", request_id=None)
    record = json.loads(line)
    assert record["message"] == "request ended: invalid_argument" and re.fullmatch("[0-9a-f]{32}", record["request_id"])


def test_other_libraries_extras_stay_out_of_text_lines():
    stream = io.StringIO()
    logger = logging.getLogger("aiohttp.access")
    handler = logs.make_handler("text", stream=stream)
    logger.addHandler(handler)
    try:  # aiohttp's access log passes the fields of its own line again as extras
        logger.warning('"GET /health" 200', extra={"first_request_line": "GET /health", "status": 200})
    finally:
        logger.removeHandler(handler)
    assert stream.getvalue().rstrip().endswith('aiohttp.access: "GET /health" 200')
