"""The OpenAI HTTP server without workers: its error answers and its lifecycle."""

from __future__ import annotations

import contextlib
import gzip
import json

import aiohttp
import pytest

from pdserve.common import genai
from pdserve.common.engine.sampling_params import SamplingParams
from pdserve.common.errors import (
    CapacityExhaustedError,
    InvalidRequestError,
    NotReadyError,
    TransferFailedError,
    TransferTimeoutError,
)
from pdserve.router.models import genai_attributes
from pdserve.router.openai_http import MAX_BODY_BYTES, ModelNotFoundError, OpenAIServer, error_response
from pdserve.router.prompt import GenerateInput
from pdserve.router.request_ids import check_request_id
from pdserve.router.router import Router
from pdserve.router.worker_pool import WorkerPool


class WordTokenizer:
    """Enough of a tokenizer for the router: one id per word."""

    def __len__(self) -> int:
        return 1000

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [len(w) for w in text.split()]

    def get_vocab(self) -> dict[str, int]:
        return {"w" * 40: 40}  # the longest word it spells


async def test_no_workers_means_503_in_openai_shape():
    router = Router(WordTokenizer(), WorkerPool(), mode="colocated", max_model_len=64)
    server = OpenAIServer(router, "127.0.0.1", 0, default_max_tokens=4, ready=lambda: False)
    await server.start()
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{server.port}/health") as r:
                assert r.status == 503
            async with http.post(server.url + "/completions", json={"prompt": "a b"}) as r:
                assert r.status == 503 and r.headers["Retry-After"] == "1"  # clients wait, then try again
                error = (await r.json())["error"]
                assert error["type"] == "server_error" and "no healthy decode worker" in error["message"]
            async with http.get(server.url + "/models") as r:
                assert (await r.json()) == {"object": "list", "data": []}
    finally:
        await server.stop()


async def test_http_level_errors_are_openai_shaped_too():
    router = Router(WordTokenizer(), WorkerPool(), mode="colocated", max_model_len=64)
    server = OpenAIServer(router, "127.0.0.1", 0, default_max_tokens=4, ready=lambda: True)
    await server.start()
    try:
        async with aiohttp.ClientSession() as http:
            for method, path, status in [("POST", "/nope", 404), ("GET", "/completions", 405)]:
                async with http.request(method, server.url + path) as r:
                    assert r.status == status
                    assert set((await r.json())["error"]) == {"message", "type", "param", "code"}
    finally:
        await server.stop()


@contextlib.asynccontextmanager
async def serving():
    router = Router(WordTokenizer(), WorkerPool(), mode="colocated", max_model_len=64)
    server = OpenAIServer(router, "127.0.0.1", 0, default_max_tokens=4, ready=lambda: True)
    await server.start()
    try:
        async with aiohttp.ClientSession(auto_decompress=False) as http:
            yield server, http
    finally:
        await server.stop()


def _deep(n: int) -> bytes:
    return b'{"prompt": "hi", "x": ' + b"[" * n + b"]" * n + b"}"


# Bodies and headers that reach no field check: each must be a 4xx in OpenAI's shape, never a 500.
@pytest.mark.parametrize(
    "body, headers, status, says",
    [
        (_deep(100_000), {}, 400, "nested too deeply"),
        (_deep(5_000), {}, 400, "nested too deeply"),
        (_deep(400_000), {}, 400, "nested too deeply"),  # past 256 KiB: decoded off the event loop
        (b'{"prompt": "hi"}', {"Content-Encoding": "gzip"}, 400, "content-encoding: gzip"),
        (b'{"prompt": "hi"}', {"Content-Encoding": "deflate"}, 400, "content-encoding: deflate"),
        (b'{"prompt": "hi"}', {"Content-Encoding": "br"}, 400, "br"),
        (b'{"prompt": "hi"}', {"Content-Type": "application/json; charset=nope"}, 400, "charset"),
        (b'{"prompt": "hi"}', {"X-Big": "x" * 100_000}, 400, "bad HTTP request"),
        (b"a" * (MAX_BODY_BYTES + 1), {}, 413, "Too Large"),
        (gzip.compress(b" " * (MAX_BODY_BYTES + 1)), {"Content-Encoding": "gzip"}, 413, "Too Large"),
    ],
)
async def test_bodies_and_headers_nothing_can_read_get_an_openai_error_not_a_500(body, headers, status, says):
    async with serving() as (server, http):
        async with http.post(
            server.url + "/completions", data=body, headers={"Content-Type": "application/json", **headers}
        ) as r:
            assert r.status == status and r.content_type == "application/json"
            error = (await r.json())["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert says.lower() in error["message"].lower()


async def test_a_large_body_is_decoded_and_checked_off_the_event_loop(monkeypatch):
    """Relayed tokens of every stream wait while the loop decodes: 16 MiB of token ids took ~0.25 s."""
    import threading

    from pdserve.router import openai_http

    threads = []
    parse = openai_http.parse_request
    monkeypatch.setattr(
        openai_http, "parse_request", lambda *a: threads.append(threading.current_thread()) or parse(*a)
    )
    async with serving() as (server, http):
        for ids in ([1] * 100, list(range(100_000, 400_000))):  # 0.3 KB and 2.4 MB, both past the window of 64
            async with http.post(server.url + "/completions", json={"prompt": ids, "max_tokens": 1}) as r:
                assert r.status == 400 and (await r.json())["error"]["param"] == "prompt"
    assert [t is threading.main_thread() for t in threads] == [True, False]


async def test_a_gzipped_body_is_read():
    async with serving() as (server, http):
        body = gzip.compress(b'{"prompt": "a b", "top_k": 7.5}')
        async with http.post(
            server.url + "/completions",
            data=body,
            headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
        ) as r:
            assert r.status == 400 and (await r.json())["error"]["param"] == "top_k"  # the body's own field


async def test_an_unknown_model_id_is_openais_404():
    async with serving() as (server, http):
        async with http.get(server.url + "/models/org/no-such-model") as r:
            assert r.status == 404
            error = (await r.json())["error"]
    assert (error["code"], error["param"]) == ("model_not_found", "model")
    assert "org/no-such-model" in error["message"]


def test_a_model_name_no_worker_serves_never_becomes_a_metric_label():
    # Before any worker answers every name passes the model check; a label fed from the client's
    # string would grow a series per string.
    router = Router(WordTokenizer(), WorkerPool(), mode="colocated", max_model_len=64)
    assert genai_attributes(router.pool, "fuzz-1234", chat=True)[genai.REQUEST_MODEL] == ""


async def test_disabled_server_does_not_listen():
    server = OpenAIServer(
        Router(WordTokenizer(), WorkerPool(), mode="colocated", max_model_len=64),
        "127.0.0.1",
        -1,
        default_max_tokens=4,
        ready=lambda: True,
    )
    await server.start()
    assert server.port is None and server.url is None
    await server.stop()


@pytest.mark.parametrize(
    "exc, status, param, code",
    [
        (InvalidRequestError("prompt.chat", "must not be empty"), 400, "messages", None),
        (ModelNotFoundError("no such model"), 404, "model", "model_not_found"),
        (CapacityExhaustedError("router at capacity"), 429, None, "rate_limit_exceeded"),
        (NotReadyError("no healthy decode worker"), 503, None, "service_unavailable"),
        # Every worker failed it (a transfer each time): no bug of the server's, and a later call may pass.
        (TransferFailedError("failed after 3 attempts; last: checksum mismatch"), 503, None, "service_unavailable"),
        (TransferTimeoutError("failed after 3 attempts; last: timed out"), 503, None, "service_unavailable"),
        (RuntimeError("secret internals"), 500, None, None),
    ],
)
def test_errors_map_to_openai_statuses(exc, status, param, code):
    r = error_response(exc, "chat")
    error = json.loads(r.text)["error"]
    assert (r.status, error["param"], error["code"]) == (status, param, code)
    assert "secret" not in error["message"]


async def test_the_balancer_hears_what_a_request_can_generate_not_the_max_tokens_it_asked():
    # max_tokens may be 2**32 - 1: the balancer simulates one step per token, so it would never end.
    router = Router(WordTokenizer(), WorkerPool(), mode="colocated", max_model_len=64)
    heard = []
    router.on_admitted = lambda prompt, max_tokens: heard.append((prompt, max_tokens))
    inp = GenerateInput(SamplingParams(max_tokens=2**32 - 1), text="a b c d")
    with pytest.raises(NotReadyError):  # no worker: refused after it was admitted
        async for _ in router.generate(inp):
            pass
    assert heard == [(4, 60)]


@pytest.mark.parametrize("request_id", ["a b", "line\nfeed", "x" * 129, "caf\u00e9"])
async def test_a_request_id_that_would_garble_the_logs_is_refused(request_id):
    router = Router(WordTokenizer(), WorkerPool(), mode="colocated", max_model_len=64)
    with pytest.raises(InvalidRequestError) as e:
        async for _ in router.generate(GenerateInput(SamplingParams(), text="a", request_id=request_id)):
            pass
    assert e.value.field == "request_id"


def test_a_request_id_already_in_flight_is_refused():
    # On the workers a second request under the same id would release the first one's reservation.
    assert check_request_id("mine-1", {"other"}) == "mine-1" and check_request_id("", {"x"}) == ""
    with pytest.raises(InvalidRequestError, match="already in flight") as e:
        check_request_id("mine-1", {"mine-1"})
    assert e.value.field == "request_id"
