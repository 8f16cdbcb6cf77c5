"""The router's OpenAI-compatible HTTP API, spoken to by the official `openai` client.

One in-process suite (real gRPC, UCX, SmolLM2) serves the whole module; the
router's HTTP server listens on a free port.
"""

from __future__ import annotations

import asyncio

import aiohttp
import grpc
import openai
import pytest
import pytest_asyncio

from pdserve.common.grpc_errors import ERROR_FIELD_KEY
from pdserve.router.openai_http import OpenAIServer
from pdserve.v1 import common_pb2 as pb
from pdserve.v1 import router_pb2 as rpb
from tests.polling import settles
from tests.service.suite import inprocess_suite, pools_full

pytestmark = pytest.mark.asyncio(loop_scope="module")

CHAT = [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "Name a color."}]


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def suite(smollm2):
    async with inprocess_suite(smollm2, "disaggregated") as s:
        yield s


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def client(suite):
    async with openai.AsyncOpenAI(base_url=suite.router.http.url, api_key="unused", max_retries=0) as c:
        yield c


@pytest.fixture(scope="module")
def model(smollm2):
    return smollm2[0].name


async def test_models_and_health(suite, client, model):
    listed = [m async for m in client.models.list()]
    assert [(m.id, m.object, m.owned_by) for m in listed] == [(model, "model", "pdserve")]
    async with aiohttp.ClientSession() as http:
        async with http.get(suite.router.http.url.removesuffix("/v1") + "/health") as r:
            assert r.status == 200


async def test_the_openai_client_retrieves_the_served_model_and_hears_404_for_others(client, model):
    got = await client.models.retrieve(model)
    assert (got.id, got.object, got.owned_by) == (model, "model", "pdserve")
    with pytest.raises(openai.NotFoundError) as e:
        await client.models.retrieve("gpt-4o")
    assert e.value.response.json()["error"]["code"] == "model_not_found"


async def test_top_k_and_seed_of_minus_one_mean_off_as_vllm_clients_send_them(client, model):
    kw = dict(model=model, prompt="The capital of France is", max_tokens=4, temperature=0)
    off = await client.completions.create(**kw, seed=-1, extra_body={"top_k": -1})
    plain = await client.completions.create(**kw)
    assert off.choices[0].text == plain.choices[0].text and off.usage.completion_tokens >= 1


async def test_an_unknown_chat_role_is_refused_on_both_front_ends(suite, client, model):
    with pytest.raises(openai.BadRequestError) as e:
        await client.chat.completions.create(
            model=model, max_tokens=2, messages=[*CHAT, {"role": "wizard", "content": "hi"}]
        )
    assert e.value.response.json()["error"]["param"] == "messages[2].role"
    chat = rpb.Chat(messages=[rpb.ChatMessage(role="wizard", content="hi")])
    request = rpb.GenerateRequest(chat=chat, sampling=pb.SamplingParams(max_tokens=2))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await suite.stub.Generate(request).read()
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert dict(refused.value.trailing_metadata())[ERROR_FIELD_KEY] == "prompt.chat.messages[0].role"


async def test_streamed_chat_completion_with_usage(client, model):
    stream = await client.chat.completions.create(
        model=model, messages=CHAT, max_tokens=8, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = [c async for c in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert all(c.object == "chat.completion.chunk" and c.model == model for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text and finish in (["stop"], ["length"])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens <= 8
    assert chunks[-1].usage.total_tokens == chunks[-1].usage.prompt_tokens + chunks[-1].usage.completion_tokens


async def test_streamed_completion_equals_the_unstreamed_one(client, model):
    kw = dict(model=model, prompt="The capital of France is", max_tokens=6, temperature=0)
    whole = await client.completions.create(**kw)
    stream = await client.completions.create(**kw, stream=True)
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(c.id.startswith("cmpl-") and c.object == "text_completion" for c in chunks)


async def test_unstreamed_completion_reports_usage_and_takes_token_ids(client, model, smollm2):
    ids = smollm2[2].encode("Once upon a time", add_special_tokens=False)
    r = await client.completions.create(
        model=model, prompt=ids, max_tokens=5, temperature=0, extra_body={"ignore_eos": True}
    )
    assert r.id.startswith("cmpl-") and r.object == "text_completion" and r.model == model
    assert r.choices[0].finish_reason == "length" and r.choices[0].text
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(ids), 5, len(ids) + 5)


async def test_greedy_chat_equals_the_grpc_path(suite, client, model):
    r = await client.chat.completions.create(model=model, messages=CHAT, max_completion_tokens=12, temperature=0)
    chat = rpb.Chat(messages=[rpb.ChatMessage(**m) for m in CHAT])
    req = rpb.GenerateRequest(chat=chat, sampling=pb.SamplingParams(max_tokens=12, temperature=0.0))
    grpc_text = "".join([m.text async for m in suite.stub.Generate(req)])
    assert r.choices[0].message.role == "assistant" and r.object == "chat.completion"
    assert r.choices[0].message.content == grpc_text


@pytest.mark.parametrize(
    "endpoint, body, status, param",
    [
        ("chat", {"messages": CHAT, "temperature": -1}, 400, "temperature"),
        ("chat", {"messages": CHAT, "top_p": 2}, 400, "top_p"),
        ("chat", {"messages": CHAT, "temperature": "hot"}, 400, "temperature"),
        ("chat", {"messages": []}, 400, "messages"),
        ("chat", {"messages": CHAT, "n": 2}, 400, "n"),
        ("completion", {"prompt": ""}, 400, "prompt"),
        ("completion", {"prompt": ["one", "two"]}, 400, "prompt"),
        ("completion", {"prompt": [1, 10**9]}, 400, "prompt"),
        ("completion", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
        ("completion", {"prompt": "hi", "model": "gpt-4o"}, 404, "model"),
    ],
)
async def test_bad_input_gets_an_openai_error_naming_the_field(client, model, endpoint, body, status, param):
    create = client.chat.completions.create if endpoint == "chat" else client.completions.create
    with pytest.raises(openai.APIStatusError) as e:
        await create(**{"model": model, **body})
    assert e.value.status_code == status
    error = e.value.response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]
    if status == 404:
        assert error["code"] == "model_not_found"


async def test_malformed_json_is_a_400(suite):
    async with aiohttp.ClientSession() as http:
        async with http.post(
            suite.router.http.url + "/chat/completions", data=b"{not json", headers={"Content-Type": "application/json"}
        ) as r:
            assert r.status == 400
            error = (await r.json())["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"


@pytest.mark.parametrize("stream", [True, False])
async def test_client_disconnect_cancels_downstream(suite, client, model, stream):
    kw = dict(model=model, prompt="Count: 1, 2, 3,", max_tokens=400, temperature=0, extra_body={"ignore_eos": True})
    decode = suite.decode[0].engine
    before = decode.computed_tokens
    if stream:
        got = 0
        async with await client.completions.create(**kw, stream=True) as chunks:
            async for _ in chunks:
                got += 1
                if got == 3:
                    break  # leaving the block closes the connection
    else:  # the client gives up and hangs up while the decode worker runs the request
        call = asyncio.create_task(client.completions.create(**kw))
        assert await settles(lambda: decode.stats().running > 0, interval=0.005)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
    await pools_full(suite)
    assert decode.computed_tokens - before < 400  # stopped, not run to the end


@pytest.mark.parametrize("stream", [False, True])
async def test_a_client_request_id_header_names_the_request_and_comes_back(suite, client, model, stream):
    kw = dict(model=model, prompt="Hi", max_tokens=2, extra_headers={"X-Request-Id": f"mine-{stream}"})
    if stream:
        raw = await client.completions.with_raw_response.create(**kw, stream=True)
        assert raw.headers["x-request-id"] == f"mine-{stream}"
        assert [c.id async for c in raw.parse()][0] == f"cmpl-mine-{stream}"
    else:
        raw = await client.completions.with_raw_response.create(**kw)
        assert raw.headers["x-request-id"] == f"mine-{stream}" and raw.parse().id == f"cmpl-mine-{stream}"
    async with aiohttp.ClientSession() as http:  # the id is checked as the gRPC path checks it
        body = {"model": model, "prompt": "Hi", "max_tokens": 2}
        async with http.post(suite.router.http.url + "/completions", json=body, headers={"X-Request-Id": "a b"}) as r:
            assert r.status == 400 and (await r.json())["error"]["param"] == "request_id"
        long = {"model": model, "prompt": [1] * 10_000, "max_tokens": 2}  # refused: said with the id
        async with http.post(suite.router.http.url + "/completions", json=long, headers={"X-Request-Id": "e"}) as r:
            assert r.status == 400 and r.headers["X-Request-Id"] == "e"
    async with aiohttp.ClientSession() as http:  # none given: one is made, and said
        async with http.post(suite.router.http.url + "/completions", json=body) as r:
            assert r.status == 200 and (await r.json())["id"] == "cmpl-" + r.headers["X-Request-Id"]


async def test_a_page_of_an_allowed_origin_reads_a_streamed_chat(suite, model):
    origin = "http://localhost:3000"
    server = OpenAIServer(
        suite.router.router, "127.0.0.1", 0, default_max_tokens=4, ready=lambda: True, allowed_origins=[origin]
    )
    await server.start()
    try:
        body = {"model": model, "messages": CHAT, "max_tokens": 4, "temperature": 0, "stream": True}
        async with aiohttp.ClientSession() as http:
            async with http.post(server.url + "/chat/completions", json=body, headers={"Origin": origin}) as r:
                assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
                assert r.headers["Access-Control-Allow-Origin"] == origin  # sent with the stream's headers
                events = [line for line in (await r.text()).splitlines() if line.startswith("data: ")]
        assert len(events) >= 2 and events[-1] == "data: [DONE]"
    finally:
        await server.stop()
