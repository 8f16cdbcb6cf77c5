"""The OpenAI HTTP server without workers: its error answers and its lifecycle."""
from __future__ import annotations

import json

import aiohttp
import pytest

from pdserve.common.errors import CapacityExhaustedError, InvalidRequestError, NotReadyError
from pdserve.router.openai_http import ModelNotFoundError, OpenAIServer, error_response
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
                assert r.status == 503
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


async def test_disabled_server_does_not_listen():
    server = OpenAIServer(Router(WordTokenizer(), WorkerPool(), mode="colocated", max_model_len=64),
                          "127.0.0.1", -1, default_max_tokens=4, ready=lambda: True)
    await server.start()
    assert server.port is None and server.url is None
    await server.stop()


@pytest.mark.parametrize("exc, status, param, code", [
    (InvalidRequestError("prompt.chat", "must not be empty"), 400, "messages", None),
    (ModelNotFoundError("no such model"), 404, "model", "model_not_found"),
    (CapacityExhaustedError("router at capacity"), 429, None, "rate_limit_exceeded"),
    (NotReadyError("no healthy decode worker"), 503, None, "service_unavailable"),
    (RuntimeError("secret internals"), 500, None, None),
])
def test_errors_map_to_openai_statuses(exc, status, param, code):
    r = error_response(exc, "chat")
    error = json.loads(r.text)["error"]
    assert (r.status, error["param"], error["code"]) == (status, param, code)
    assert "secret" not in error["message"]
