"""Bad input gets a clear error naming the field, and changes nothing.

Over gRPC: INVALID_ARGUMENT, the field in the details and in the
`pdserve-error-field` trailer. Over the OpenAI HTTP API: 400 with the field
as `param` (cases the `openai` client can send are in test_openai_http.py;
here are the ones it cannot, raw bytes and out-of-range JSON). After every
rejected request the router has nothing in flight, made no routing decision,
and no worker's engine saw the request: its stats are exactly what they were.
One in-process suite (real gRPC, UCX, SmolLM2) serves the module.
"""

from __future__ import annotations

import dataclasses

import aiohttp
import grpc
import pytest
import pytest_asyncio

from pdserve.common.grpc_errors import ERROR_FIELD_KEY
from pdserve.common.server import DEFAULT_OPTIONS
from pdserve.router.openai_http import MAX_BODY_BYTES
from pdserve.v1 import common_pb2 as pb
from pdserve.v1 import decode_pb2 as dpb
from pdserve.v1 import prefill_pb2 as ppb
from pdserve.v1 import router_pb2 as rpb
from tests.service.suite import inprocess_suite

pytestmark = pytest.mark.asyncio(loop_scope="module")

CONTEXT = 2048  # the in-process router's context window
GENERATE = "/pdserve.v1.Router/Generate"
MAX_MESSAGE = DEFAULT_OPTIONS["grpc.max_receive_message_length"]


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def suite(smollm2):
    async with inprocess_suite(smollm2, "disaggregated") as s:
        yield s


@pytest.fixture(scope="module")
def vocab(smollm2) -> int:
    return len(smollm2[2])


def state(suite) -> tuple:
    """Everything a request could change: the router's counts, every engine's stats."""
    router = suite.router.router
    return (
        router.inflight,
        dict(router.decisions),
        [(w.inflight, w.inflight_tokens, w.own_prompt_tokens) for w in router.pool.all],
        [dataclasses.astuple(rt.engine.stats()) for rt in suite.decode + suite.prefill],
    )


def assert_idle(suite) -> None:
    assert suite.router.router.inflight == 0
    for rt in suite.decode + suite.prefill:
        s = rt.engine.stats()
        assert s.free_blocks == s.total_blocks and s.reserved == s.held == s.running == s.waiting == 0, s


async def rejected(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        async for response in call:
            pytest.fail(f"a bad request got a response: {response}")
    return failure.value


def sampling(**kw) -> rpb.GenerateRequest:
    return rpb.GenerateRequest(text="Hello", sampling=pb.SamplingParams(**{"max_tokens": 4, **kw}))


GRPC_CASES = {  # name -> (request, the field the error names)
    "no prompt at all": (lambda v: rpb.GenerateRequest(), "prompt"),
    "empty text": (lambda v: rpb.GenerateRequest(text=""), "prompt"),
    "empty token list": (lambda v: rpb.GenerateRequest(token_ids=pb.TokenIds()), "prompt.token_ids"),
    "chat without messages": (lambda v: rpb.GenerateRequest(chat=rpb.Chat()), "prompt.chat"),
    "token ids as long as the context": (
        lambda v: rpb.GenerateRequest(token_ids=pb.TokenIds(ids=[100] * CONTEXT)),
        "prompt.token_ids",
    ),
    # Refused on its length, before the router makes 4M Python ints of it (150 MB).
    "four million token ids": (
        lambda v: rpb.GenerateRequest(token_ids=pb.TokenIds(ids=[1] * 2**22)),
        "prompt.token_ids",
    ),
    "text longer than the context": (lambda v: rpb.GenerateRequest(text=" hello" * (CONTEXT + 10)), "prompt"),
    # Too many characters for any tokenization to fit: refused before the router spends seconds encoding it.
    "a megabyte of text": (lambda v: rpb.GenerateRequest(text="x" * 2**20), "prompt.text"),
    "a megabyte of chat": (
        lambda v: rpb.GenerateRequest(chat=rpb.Chat(messages=[rpb.ChatMessage(role="user", content="y" * 2**19)] * 2)),
        "prompt.chat",
    ),
    "token id just past the vocabulary": (
        lambda v: rpb.GenerateRequest(token_ids=pb.TokenIds(ids=[100, v])),
        "prompt.token_ids",
    ),
    "token id far outside the vocabulary": (
        lambda v: rpb.GenerateRequest(token_ids=pb.TokenIds(ids=[10**7])),
        "prompt.token_ids",
    ),
    "max_tokens 0": (lambda v: sampling(max_tokens=0), "max_tokens"),
    "negative temperature": (lambda v: sampling(temperature=-1), "temperature"),
    "NaN temperature": (lambda v: sampling(temperature=float("nan")), "temperature"),
    "infinite temperature": (lambda v: sampling(temperature=float("inf")), "temperature"),
    "top_p 0": (lambda v: sampling(top_p=0.0), "top_p"),
    "top_p above 1": (lambda v: sampling(top_p=1.5), "top_p"),
    "NaN top_p": (lambda v: sampling(top_p=float("nan")), "top_p"),
    "empty stop string": (lambda v: sampling(stop=["ok", ""]), "stop"),
    "unknown model": (lambda v: rpb.GenerateRequest(text="Hello", model="gpt-4o"), "model"),
}


@pytest.mark.parametrize("case", GRPC_CASES)
async def test_grpc_bad_input_is_invalid_argument_naming_the_field_and_changes_nothing(suite, vocab, case):
    build, field = GRPC_CASES[case]
    assert_idle(suite)
    before = state(suite)
    err = await rejected(suite.stub.Generate(build(vocab)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
    assert err.details().startswith(f"{field}: ")
    assert dict(err.trailing_metadata())[ERROR_FIELD_KEY] == field
    assert state(suite) == before


def _with_bytes(request: rpb.GenerateRequest, placeholder: str, raw: bytes) -> bytes:
    """The serialized request with `placeholder`'s UTF-8 replaced by `raw` (same length)."""
    data = request.SerializeToString()
    assert len(raw) == len(placeholder.encode()) and data.count(placeholder.encode()) == 1
    return data.replace(placeholder.encode(), raw)


CHAT = rpb.Chat(messages=[rpb.ChatMessage(role="user", content="Hi"), rpb.ChatMessage(role="user", content="QQQQ")])
RAW_CASES = {  # name -> (serialized request bytes, the field the error names)
    "invalid UTF-8 text": (_with_bytes(rpb.GenerateRequest(text="QQQQ"), "QQQQ", b"ab\xff\xfe"), "prompt.text"),
    "a UTF-8 encoded surrogate": (_with_bytes(rpb.GenerateRequest(text="QQQ"), "QQQ", b"\xed\xa0\x80"), "prompt.text"),
    "invalid UTF-8 in a chat message": (
        _with_bytes(rpb.GenerateRequest(chat=CHAT), "QQQQ", b"\xc0\x80ab"),
        "prompt.chat.messages[1].content",
    ),
    "invalid UTF-8 in a stop string": (
        _with_bytes(sampling(stop=["end", "QQQQ"]), "QQQQ", b"\xffabc"),
        "sampling.stop[1]",
    ),
    "invalid UTF-8 in the request id": (
        _with_bytes(rpb.GenerateRequest(request_id="QQQQ", text="Hi"), "QQQQ", b"r\x80\x80r"),
        "request_id",
    ),
    "bytes that are no message": (b"\x12\xff\xff\xff", "request"),
}


@pytest.mark.parametrize("case", RAW_CASES)
async def test_undecodable_bytes_are_invalid_argument_naming_the_field_not_unknown(suite, case):
    data, field = RAW_CASES[case]
    before = state(suite)
    raw_generate = suite.channel.unary_stream(GENERATE)  # bytes in, bytes out: no client-side checks
    err = await rejected(raw_generate(data))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
    assert err.details().startswith(f"{field}: ")
    assert dict(err.trailing_metadata())[ERROR_FIELD_KEY] == field
    assert state(suite) == before


async def test_a_message_over_the_size_limit_is_refused_by_grpc_with_resource_exhausted(suite):
    # gRPC core refuses it before any pdserve code runs; its code, not ours.
    before = state(suite)
    oversized = rpb.GenerateRequest(text="a" * (MAX_MESSAGE + 1))
    async with grpc.aio.insecure_channel(
        f"127.0.0.1:{suite.router.port}", options=[("grpc.max_send_message_length", -1)]
    ) as channel:
        raw_generate = channel.unary_stream(GENERATE)
        err = await rejected(raw_generate(oversized.SerializeToString()))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in err.details()
    assert state(suite) == before


# ---- the workers' own check: KV of another model or layout never lands ----------
FINGERPRINTS = {
    "missing": lambda spec: b"",
    "another model's": lambda spec: bytes(b ^ 0xFF for b in spec.fingerprint),
    "a bfloat16 worker's": lambda spec: dataclasses.replace(spec, dtype="bfloat16").fingerprint,
}


@pytest.mark.parametrize("fingerprint", FINGERPRINTS)
async def test_a_decode_worker_reserves_nothing_for_a_sender_of_another_kv_layout(suite, fingerprint):
    spec = suite.decode[0].engine.spec  # float32 (the suite's)
    before = state(suite)
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await suite.worker_stubs()[0].Reserve(
            dpb.ReserveRequest(
                request_id="fp", prompt_token_ids=list(range(100, 140)), kv_fingerprint=FINGERPRINTS[fingerprint](spec)
            )
        )
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert dict(failure.value.trailing_metadata())[ERROR_FIELD_KEY] == "kv_fingerprint"
    assert state(suite) == before


@pytest.mark.parametrize("fingerprint", FINGERPRINTS)
async def test_a_prefill_worker_computes_nothing_for_a_ticket_of_another_kv_layout(suite, fingerprint):
    spec = suite.prefill[0].engine.spec  # float32 (the suite's)
    ticket = pb.TransferTicket(
        transfer_id="fp",
        secret=bytes(32),
        ucx_address=b"x",
        dest_block_ids=[0, 1],
        num_blocks=2,
        block_bytes=spec.block_bytes,
        kv_fingerprint=FINGERPRINTS[fingerprint](spec),
    )
    before = state(suite)
    prefill = suite.worker_stubs()[-1]
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await prefill.Prefill(
            ppb.PrefillRequest(
                request_id="fp",
                prompt_token_ids=list(range(100, 140)),
                sampling=pb.SamplingParams(max_tokens=1),
                ticket=ticket,
            )
        )
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert dict(failure.value.trailing_metadata())[ERROR_FIELD_KEY] == "ticket.kv_fingerprint"
    assert state(suite) == before


async def test_good_requests_still_work_after_all_that(suite):
    tokens, last = [], None
    async for r in suite.stub.Generate(sampling(temperature=0.0)):
        tokens += r.token_ids
        last = r
    assert len(tokens) == 4 and last.finish_reason == pb.FINISH_REASON_LENGTH
    assert_idle(suite)


# ---- the OpenAI HTTP API ----------------------------------------------------------
HTTP_CASES = {  # name -> (endpoint, raw body, status, param)
    "text longer than the context": ("completions", '{"prompt": "%s"}' % (" hello" * (CONTEXT + 10)), 400, "prompt"),
    "a megabyte of text": ("completions", '{"prompt": "%s"}' % ("x" * 2**20), 400, "prompt"),
    "a megabyte of chat": (
        "chat/completions",
        '{"messages": [{"role": "user", "content": "%s"}]}' % ("y" * 2**20),
        400,
        "messages",
    ),
    "negative token id": ("completions", '{"prompt": [1, -1]}', 400, "prompt"),
    "max_tokens past uint32": ("completions", '{"prompt": "hi", "max_tokens": 4294967296}', 400, "max_tokens"),
    "negative max_tokens": ("completions", '{"prompt": "hi", "max_tokens": -1}', 400, "max_tokens"),
    "top_k below -1 (-1 is off)": ("completions", '{"prompt": "hi", "top_k": -2}', 400, "top_k"),
    "top_p 0": ("completions", '{"prompt": "hi", "top_p": 0}', 400, "top_p"),
    "NaN temperature": ("completions", '{"prompt": "hi", "temperature": NaN}', 400, "temperature"),
    "infinite temperature": ("completions", '{"prompt": "hi", "temperature": Infinity}', 400, "temperature"),
    "lone surrogate in the prompt": ("completions", '{"prompt": "a\\ud800b"}', 400, "prompt"),
    "lone surrogate in a message": (
        "chat/completions",
        '{"messages": [{"role": "user", "content": "\\udfff"}]}',
        400,
        "messages[0].content",
    ),
    "lone surrogate in a stop string": ("completions", '{"prompt": "hi", "stop": ["\\ud83d"]}', 400, "stop"),
}


async def post(suite, endpoint: str, body: bytes) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as http:
        async with http.post(
            f"{suite.router.http.url}/{endpoint}", data=body, headers={"Content-Type": "application/json"}
        ) as r:
            return r.status, (await r.json())["error"]


@pytest.mark.parametrize("case", HTTP_CASES)
async def test_http_bad_input_is_a_400_naming_the_field_and_changes_nothing(suite, case):
    endpoint, body, status, param = HTTP_CASES[case]
    before = state(suite)
    got, error = await post(suite, endpoint, body.encode())
    assert (got, error["param"], error["type"]) == (status, param, "invalid_request_error"), error
    assert error["message"].startswith(f"{param}: ")  # the router's "prompt.token_ids" is OpenAI's "prompt"
    assert state(suite) == before


async def test_http_body_that_is_not_utf8_is_a_400(suite):
    before = state(suite)
    status, error = await post(suite, "completions", b'{"prompt": "\xff\xfe"}')
    assert status == 400 and error["type"] == "invalid_request_error" and "JSON" in error["message"]
    assert state(suite) == before


async def test_http_body_over_the_limit_is_a_413(suite):
    before = state(suite)
    status, error = await post(suite, "completions", b'{"prompt": "' + b"a" * MAX_BODY_BYTES + b'"}')
    assert status == 413 and error["type"] == "invalid_request_error"
    assert state(suite) == before
