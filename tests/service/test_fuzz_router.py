"""Property-based fuzzing of the router's two front ends, against a real suite.

Hypothesis draws whole GenerateRequests: prompts as text (any Unicode), token
ids (inside and far outside the vocabulary) or chats (any roles), sampling
fields at their extremes (NaN, infinities, huge top_k and seeds, odd stop
strings and stop tokens), client request ids and model names. Properties:
every call ends, either as a complete stream (tokens, then a finish reason
and usage that add up) or with INVALID_ARGUMENT / RESOURCE_EXHAUSTED; never
INTERNAL, UNKNOWN or an empty success; and afterwards nothing is in flight and
every worker's pool is full again. One in-process suite (real gRPC, UCX,
SmolLM2) serves all examples; max_tokens stays small so the run stays short.

The OpenAI HTTP front end gets whole requests as bytes: bodies nested up to 100k deep,
content encodings true and false, huge and many headers, unknown charsets, any chat
role, top_k and seed at -1 and past their ranges. Properties: never a 5xx; a refusal is
a 4xx in OpenAI's JSON error shape; a request with nothing wrong completes.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import math
import zlib

import aiohttp
import grpc
import pytest
import pytest_asyncio
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from pdserve.v1 import common_pb2 as pb
from pdserve.v1 import router_pb2 as rpb
from tests.service.suite import inprocess_suite

pytestmark = pytest.mark.asyncio(loop_scope="module")

VOCAB = 49152  # SmolLM2's
MODEL = "SmolLM2-135M-Instruct"
REFUSALS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}

# Unicode of every kind: combining marks, emoji, right-to-left, controls, private
# use, and the chat template's own markers. (Surrogates cannot travel in proto3 strings.)
unicode_text = st.one_of(
    st.text(max_size=60),
    st.text(st.characters(codec="utf-8"), max_size=60),
    st.sampled_from(["<|im_start|>", "<|im_end|>", "\u202e\u0301\ufeff", "🤖👩‍👩‍👧", "\x00\x07", "\uffff\U0010ffff"]),
)
in_vocab = st.integers(0, VOCAB - 1)
any_token = st.one_of(in_vocab, st.integers(VOCAB - 2, VOCAB + 2), st.integers(0, 2**32 - 1))
any_float = st.floats(width=32, allow_nan=True, allow_infinity=True)
ROLES = ("system", "user", "assistant", "tool", "developer")
chat_message = st.builds(rpb.ChatMessage, role=st.one_of(st.sampled_from(ROLES), unicode_text), content=unicode_text)

# Per field: (values that are valid, values of any kind). A request is refused
# for its first bad field, so each example draws most fields from the valid
# side and only a few ("broken") from anything; broken-free requests run.
FIELDS = {
    "prompt": (
        st.one_of(
            unicode_text.filter(bool).map(lambda t: {"text": t}),
            st.lists(in_vocab, min_size=1, max_size=40).map(lambda ids: {"token_ids": ids}),
            st.lists(chat_message, min_size=1, max_size=4).map(lambda m: {"chat": m}),
        ),
        st.one_of(
            st.just({}),
            st.just({"text": ""}),
            st.just({"chat": []}),
            st.lists(any_token, max_size=40).map(lambda ids: {"token_ids": ids}),
        ),
    ),
    "temperature": (st.one_of(st.none(), st.floats(0, 2, width=32), st.sampled_from([1e-45, 3e38])), any_float),
    "top_p": (st.one_of(st.none(), st.floats(0, 1, exclude_min=True, width=32)), any_float),
    "stop": (st.lists(unicode_text.filter(bool), max_size=3), st.lists(unicode_text, min_size=1, max_size=3)),
    "model": (st.sampled_from(["", MODEL]), unicode_text),
    "max_tokens": (st.integers(1, 4), st.just(0)),  # always set: the default (256) would make the run long
}


@st.composite
def generate_request(draw) -> rpb.GenerateRequest:
    n = draw(st.sampled_from([0, 0, 1, 2]))  # about half the requests valid
    broken = draw(st.sets(st.sampled_from(list(FIELDS)), min_size=n, max_size=n))
    value = {name: draw(anything if name in broken else valid) for name, (valid, anything) in FIELDS.items()}
    p = pb.SamplingParams(
        max_tokens=value["max_tokens"],
        stop=value["stop"],
        top_k=draw(st.one_of(st.just(0), st.integers(0, 2**32 - 1))),
        stop_token_ids=draw(st.lists(any_token, max_size=3)),  # any uint32: they only ever fail to match
        ignore_eos=draw(st.booleans()),
        logprobs=draw(st.booleans()),
    )
    for name in ("temperature", "top_p"):
        if value[name] is not None:
            setattr(p, name, value[name])
    if draw(st.booleans()):
        p.seed = draw(st.integers(0, 2**64 - 1))
    req = rpb.GenerateRequest(request_id=draw(st.one_of(st.just(""), unicode_text)), sampling=p, model=value["model"])
    prompt = value["prompt"]
    if "text" in prompt:
        req.text = prompt["text"]
    elif "token_ids" in prompt:
        req.token_ids.ids.extend(prompt["token_ids"])
    elif "chat" in prompt:
        req.chat.SetInParent()  # an empty chat is still a chat
        req.chat.messages.extend(prompt["chat"])
    return req


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def suite(smollm2):
    async with inprocess_suite(smollm2, "disaggregated") as s:
        yield s


async def _outcome(suite, req: rpb.GenerateRequest):
    """The finished stream's responses, or the RpcError the call ended with."""
    try:
        return [r async for r in suite.stub.Generate(req)]
    except grpc.aio.AioRpcError as e:
        return e


async def _idle(suite) -> None:
    for _ in range(250):
        stats = [rt.engine.stats() for rt in suite.decode + suite.prefill]
        if suite.router.router.inflight == 0 and all(
            s.free_blocks == s.total_blocks and s.reserved == s.held == s.running == s.waiting == 0 for s in stats
        ):
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"not idle 5 s after the call ended: inflight {suite.router.router.inflight}, {stats}")


def _valid_float(value: float, low_open: bool) -> bool:
    return math.isfinite(value) and (value > 0 if low_open else value >= 0)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(req=generate_request())
async def test_every_request_ends_complete_or_refused_and_leaves_every_pool_full(suite, req):
    outcome = await asyncio.wait_for(_outcome(suite, req), timeout=60)  # never a hang
    event("refused: " + outcome.details().split(":")[0] if isinstance(outcome, grpc.aio.AioRpcError) else "completed")
    if isinstance(outcome, grpc.aio.AioRpcError):
        assert outcome.code() in REFUSALS, f"{outcome.code().name}: {outcome.details()}"
        assert outcome.details()  # a message that says why
    else:
        assert outcome, "an empty success"
        last = outcome[-1]
        assert last.finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH), last
        assert all(r.finish_reason == pb.FINISH_REASON_UNSPECIFIED for r in outcome[:-1])
        tokens = [t for r in outcome for t in r.token_ids]
        assert 1 <= len(tokens) == last.usage.completion_tokens <= req.sampling.max_tokens
        assert last.usage.prompt_tokens > 0 and all(t < VOCAB for t in tokens)
        # What the suite accepted was valid: the refusals above are the only way out.
        s = req.sampling
        assert s.max_tokens >= 1 and req.model in ("", MODEL)
        assert not s.HasField("temperature") or _valid_float(s.temperature, low_open=False)
        assert not s.HasField("top_p") or (_valid_float(s.top_p, low_open=True) and s.top_p <= 1)
        assert all(m.role in ROLES for m in req.chat.messages)
    await _idle(suite)


# -- the HTTP front end ---
# Per part of an HTTP request: (values with nothing wrong, values that must be refused).
NEST = "__nest__"  # where a nested array goes in the JSON text (json.dumps itself would recurse)
HTTP_PARTS = {
    "role": (st.sampled_from(ROLES), st.one_of(unicode_text.filter(lambda r: r not in ROLES), st.just("function"))),
    "top_k": (st.sampled_from([None, -1, 0, 1, 40, 2**32 - 1]), st.sampled_from([-2, 2**32, 1.5, "5", True, NEST])),
    "seed": (
        st.sampled_from([None, -1, 0, 7, -(2**63), 2**64 - 1]),
        st.sampled_from([-(2**63) - 1, 2**64, 0.5, "7", NEST]),
    ),
    "depth": (st.sampled_from([1, 10, 100]), st.sampled_from([5_000, 100_000])),  # of an unknown field's array
    "encoding": (
        st.sampled_from(["", "identity", "gzip", "deflate"]),
        st.sampled_from(["gzip-plain", "deflate-plain", "br", "zstd"]),
    ),
    # One header this long, or (negative) this many headers.
    "header": (st.sampled_from([0, 100, 8_000]), st.sampled_from([100_000, -200])),
    "charset": (st.sampled_from(["", "utf-8"]), st.sampled_from(["nope", "base64"])),
}


@st.composite
def http_request(draw) -> tuple[str, bytes, dict[str, str], bool]:
    """(path, body, headers, broken): a request with its parts valid except the broken ones."""
    n = draw(st.sampled_from([0, 0, 1, 2]))
    broken = draw(st.sets(st.sampled_from(list(HTTP_PARTS)), min_size=n, max_size=n))
    part = {name: draw(bad if name in broken else good) for name, (good, bad) in HTTP_PARTS.items()}
    chat = draw(st.booleans()) or "role" in broken
    body: dict = {"max_tokens": draw(st.integers(1, 3)), "stream": draw(st.booleans()), "x": NEST}
    if chat:
        body["messages"] = [{"role": part["role"], "content": draw(unicode_text)}]
    else:
        body["prompt"] = draw(unicode_text.filter(bool))
    body |= {k: part[k] for k in ("top_k", "seed") if part[k] is not None}
    text = json.dumps(body).encode()
    nested = b"[" * part["depth"] + b"]" * part["depth"]
    data = text.replace(f'"{NEST}"'.encode(), nested, 1).replace(f'"{NEST}"'.encode(), b"[[[[[[1]]]]]]")
    charset = f"; charset={part['charset']}" if part["charset"] else ""
    headers = {"Content-Type": "application/json" + charset}
    encoding = part["encoding"]
    if encoding in ("gzip", "deflate"):
        data = gzip.compress(data) if encoding == "gzip" else zlib.compress(data)
    if encoding not in ("", "identity"):
        headers["Content-Encoding"] = encoding.removesuffix("-plain")
    if part["header"] > 0:
        headers["X-Pad"] = "x" * part["header"]
    else:
        headers |= {f"X-Pad-{i}": "x" for i in range(-part["header"])}
    return ("/chat/completions" if chat else "/completions"), data, headers, bool(broken)


async def _http_outcome(url: str, data: bytes, headers: dict[str, str]) -> tuple[int, str, bytes]:
    async with aiohttp.ClientSession(auto_decompress=False) as http:
        async with http.post(url, data=data, headers=headers) as r:
            return r.status, r.content_type, await r.read()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(request=http_request())
async def test_every_http_request_completes_or_gets_an_openai_error_never_a_500(suite, request):
    path, data, headers, broken = request
    outcome = _http_outcome(suite.router.http.url + path, data, headers)
    status, content_type, raw = await asyncio.wait_for(outcome, 60)  # never a hang
    event(f"HTTP {status}")
    assert status < 500, raw[:300]
    if status != 200:
        assert 400 <= status < 500 and content_type == "application/json", (status, raw[:300])
        error = json.loads(raw)["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], error
        assert broken, f"a request with nothing wrong was refused: {error}"
    else:
        assert not broken, "a broken request was accepted"
        if content_type == "text/event-stream":
            events = [line[6:] for line in raw.decode().splitlines() if line.startswith("data: ")]
            assert events[-1] == "[DONE]" and not any('"error"' in e for e in events), events[-3:]
            last = json.loads(events[-2])
        else:
            last = json.loads(raw)
        assert last["choices"][0]["finish_reason"] in ("stop", "length")
    await _idle(suite)
