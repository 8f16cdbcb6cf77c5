"""Structured logs (pdserve.common.logs): one line per event, request and trace ids on every line."""

from __future__ import annotations

import asyncio
import io
import json
import logging

import pytest
from opentelemetry.sdk.trace import TracerProvider

from pdserve.common import logs
from pdserve.common.worker_config import WorkerConfig
from pdserve.kvstore.config import KVStoreConfig
from pdserve.router.config import RouterConfig


@pytest.fixture
def capture():
    """(logger, stream): a logger writing JSON lines through the real handler into a buffer."""
    stream = io.StringIO()
    logger = logging.getLogger(f"test.logs.{id(stream)}")
    logger.propagate, logger.level = False, logging.DEBUG
    handler = logs.make_handler("json", service="router", stream=stream)
    logger.addHandler(handler)
    yield logger, stream
    logger.removeHandler(handler)


def lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_line_carries_request_id_and_trace_id_of_the_current_span(capture):
    logger, stream = capture
    tracer = TracerProvider().get_tracer("test")  # a real SDK span; no global provider needed
    with tracer.start_as_current_span("generate") as span:
        token = logs.bind_request("req-42")
        logger.info("request finished: %s", "stop", extra={"output_tokens": 7, "ttft_ms": 12.5})
        logs.unbind_request(token)
    (line,) = lines(stream)
    ctx = span.get_span_context()
    assert line["request_id"] == "req-42"
    assert line["trace_id"] == format(ctx.trace_id, "032x") and len(line["trace_id"]) == 32
    assert line["span_id"] == format(ctx.span_id, "016x")
    assert line["message"] == "request finished: stop" and line["level"] == "INFO"
    assert line["service"] == "router" and line["output_tokens"] == 7 and line["ttft_ms"] == 12.5
    assert line["time"].endswith("+00:00")


def test_no_span_and_no_request_means_no_ids(capture):
    logger, stream = capture
    asyncio.run(_log_in_fresh_task(logger))  # a fresh task: nothing bound
    (line,) = lines(stream)
    assert "trace_id" not in line and "request_id" not in line


async def _log_in_fresh_task(logger: logging.Logger) -> None:
    logger.warning("idle")


async def test_concurrent_requests_keep_their_own_ids(capture):
    logger, stream = capture

    async def handle(rid: str) -> None:
        logs.bind_request(rid)
        for _ in range(3):
            await asyncio.sleep(0)  # interleave with the other request
            logger.info("step")

    await asyncio.gather(asyncio.create_task(handle("a")), asyncio.create_task(handle("b")))
    got = [line["request_id"] for line in lines(stream)]
    assert sorted(got) == ["a", "a", "a", "b", "b", "b"] and got != sorted(got)  # interleaved, never mixed up


def test_a_traceback_stays_inside_its_one_json_line(capture):
    logger, stream = capture
    try:
        raise RuntimeError("boom\nsecond line")
    except RuntimeError:
        logger.exception("step failed")
    assert len(stream.getvalue().splitlines()) == 1
    (line,) = lines(stream)
    assert "RuntimeError: boom" in line["exception"] and "Traceback" in line["exception"]


def test_text_format_appends_the_ids():
    stream = io.StringIO()
    logger = logging.getLogger("test.logs.text")
    logger.propagate = False
    handler = logs.make_handler("text", stream=stream)
    logger.addHandler(handler)
    try:
        tracer = TracerProvider().get_tracer("test")
        with tracer.start_as_current_span("x") as span:
            token = logs.bind_request("r1")
            logger.warning("hello")
            logs.unbind_request(token)
    finally:
        logger.removeHandler(handler)
    text = stream.getvalue().strip()
    assert text.endswith(f"hello [request_id=r1 trace_id={span.get_span_context().trace_id:032x}]")
    assert " WARNING test.logs.text: " in text


def test_setup_installs_one_root_handler_in_the_chosen_format():
    root = logging.getLogger()
    saved, level = list(root.handlers), root.level
    stream = io.StringIO()
    try:
        logs.setup("info", "json", service="decode", stream=stream)
        assert len(root.handlers) == 1 and root.level == logging.INFO
        logging.getLogger("pdserve.test").info("ready")
        logging.getLogger("pdserve.test").debug("not at INFO")
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in saved:
            root.addHandler(h)
        root.setLevel(level)
    (line,) = lines(stream)
    assert line["service"] == "decode" and line["message"] == "ready" and line["logger"] == "pdserve.test"
    with pytest.raises(ValueError, match="log format"):
        logs.make_handler("xml")  # type: ignore[arg-type]


@pytest.mark.parametrize("config", [RouterConfig, WorkerConfig, KVStoreConfig])
def test_every_service_takes_log_format_from_pdserve_log_format(config):
    import argparse

    parser = config.add_cli_args(argparse.ArgumentParser())
    assert config.from_cli_args(parser.parse_args([]), environ={}).log_format == "text"
    assert config.from_cli_args(parser.parse_args([]), environ={"PDSERVE_LOG_FORMAT": "json"}).log_format == "json"
    with pytest.raises(ValueError, match="PDSERVE_LOG_FORMAT"):
        config.from_cli_args(parser.parse_args([]), environ={"PDSERVE_LOG_FORMAT": "yaml"})
