"""Browser pages call the OpenAI HTTP API only from the origins the router allows (CORS)."""

from __future__ import annotations

import argparse
import contextlib

import aiohttp
import pytest

from pdserve.common.auth import ApiKeys
from pdserve.router.config import RouterConfig
from pdserve.router.openai_http import OpenAIServer
from pdserve.router.router import Router
from pdserve.router.worker_pool import WorkerPool
from tests.unit.test_openai_server import WordTokenizer

APP, OTHER = "https://app.example", "https://evil.example"
PREFLIGHT = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization, content-type"}


@contextlib.asynccontextmanager
async def serving(**kw):
    router = Router(WordTokenizer(), WorkerPool(), mode="colocated", max_model_len=64)
    server = OpenAIServer(router, "127.0.0.1", 0, default_max_tokens=4, ready=lambda: True, **kw)
    await server.start()
    try:
        async with aiohttp.ClientSession() as http:
            yield http, server.url
    finally:
        await server.stop()


async def test_no_origin_is_allowed_by_default():
    async with serving() as (http, url):
        async with http.options(url + "/completions", headers={"Origin": APP, **PREFLIGHT}) as r:
            assert r.status == 405 and "Access-Control-Allow-Origin" not in r.headers
        async with http.get(url + "/models", headers={"Origin": APP}) as r:
            assert r.status == 200 and "Access-Control-Allow-Origin" not in r.headers


async def test_an_allowed_origin_passes_the_preflight_without_a_key_and_reads_every_answer():
    async with serving(allowed_origins=[APP], api_keys=ApiKeys(["k1"])) as (http, url):
        async with http.options(url + "/chat/completions", headers={"Origin": APP, **PREFLIGHT}) as r:
            assert r.status == 204
            assert r.headers["Access-Control-Allow-Origin"] == APP and "Origin" in r.headers["Vary"]
            assert r.headers["Access-Control-Allow-Headers"] == PREFLIGHT["Access-Control-Request-Headers"]
            assert "POST" in r.headers["Access-Control-Allow-Methods"]
            assert "Access-Control-Allow-Credentials" not in r.headers  # no cookies, ever
        async with http.get(url + "/models", headers={"Origin": APP}) as r:  # the key is still required
            assert r.status == 401 and r.headers["Access-Control-Allow-Origin"] == APP  # and the page reads why
        async with http.get(url + "/models", headers={"Origin": APP, "Authorization": "Bearer k1"}) as r:
            assert r.status == 200 and r.headers["Access-Control-Allow-Origin"] == APP
            assert r.headers["Access-Control-Expose-Headers"] == "X-Request-Id, Retry-After"
        # No worker: a 503, whose body a page must be able to read as well.
        body = {"prompt": "a b", "stream": True}
        headers = {"Origin": APP, "Authorization": "Bearer k1"}
        async with http.post(url + "/completions", json=body, headers=headers) as r:
            assert r.status == 503 and r.headers["Access-Control-Allow-Origin"] == APP


async def test_another_origin_is_refused_in_openai_shape_and_given_no_allowing_header():
    async with serving(allowed_origins=[APP]) as (http, url):
        async with http.options(url + "/completions", headers={"Origin": OTHER, **PREFLIGHT}) as r:
            assert r.status == 403 and "Access-Control-Allow-Origin" not in r.headers
            error = (await r.json())["error"]
            assert OTHER in error["message"] and error["type"] == "invalid_request_error"
        async with http.get(url + "/models", headers={"Origin": OTHER}) as r:  # the browser then hides it
            assert r.status == 200 and "Access-Control-Allow-Origin" not in r.headers
        async with http.get(url + "/models") as r:  # no Origin: still marked as depending on it, for caches
            assert "Access-Control-Allow-Origin" not in r.headers and "Origin" in r.headers["Vary"]


async def test_a_configured_origin_matches_as_a_browser_spells_it():
    async with serving(allowed_origins=["https://App.Example:443/"]) as (http, url):
        async with http.options(url + "/completions", headers={"Origin": APP, **PREFLIGHT}) as r:
            assert r.status == 204 and r.headers["Access-Control-Allow-Origin"] == APP


async def test_a_star_allows_every_origin_with_one_cacheable_answer():
    async with serving(allowed_origins=["*"]) as (http, url):
        for origin in (APP, OTHER, "http://localhost:3000"):
            async with http.options(url + "/completions", headers={"Origin": origin, **PREFLIGHT}) as r:
                assert r.status == 204 and r.headers["Access-Control-Allow-Origin"] == "*"
                assert "Vary" not in r.headers
        async with http.get(url + "/models") as r:  # one answer for every origin, or none, to cache
            assert r.headers["Access-Control-Allow-Origin"] == "*"


def _config(*argv: str, env: dict | None = None) -> RouterConfig:
    parser = RouterConfig.add_cli_args(argparse.ArgumentParser())
    return RouterConfig.from_cli_args(parser.parse_args(list(argv)), environ=env or {})


def test_origins_come_from_a_flag_or_the_environment_and_a_malformed_one_names_the_setting():
    assert _config("--allowed-origins", APP, "http://localhost:3000").allowed_origins == [APP, "http://localhost:3000"]
    assert _config(env={"PDSERVE_ALLOWED_ORIGINS": f"{APP}, *"}).allowed_origins == [APP, "*"]
    assert _config().allowed_origins == []
    for bad in ("app.example", "https://app.example/path", "ftp://app.example", "https://*.example.com"):
        with pytest.raises(ValueError, match="--allowed-origins / PDSERVE_ALLOWED_ORIGINS") as e:
            _config("--allowed-origins", bad)
        assert repr(bad) in str(e.value)
