"""Property-based fuzzing of the router's request fields, against a real suite.

Hypothesis draws whole GenerateRequests: prompts as text (any Unicode), token
ids (inside and far outside the vocabulary) or chats (any roles), sampling
fields at their extremes (NaN, infinities, huge top_k and seeds, odd stop
strings and stop tokens), client request ids and model names. Properties:
every call ends, either as a complete stream (tokens, then a finish reason
and usage that add up) or with INVALID_ARGUMENT / RESOURCE_EXHAUSTED; never
INTERNAL, UNKNOWN or an empty success; and afterwards nothing is in flight and
every worker's pool is full again. One in-process suite (real gRPC, UCX,
SmolLM2) serves all examples; max_tokens stays small so the run stays short.
"""
from __future__ import annotations

import asyncio
import math

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
chat_message = st.builds(rpb.ChatMessage, role=st.one_of(st.sampled_from(["system", "user", "assistant"]), unicode_text),
                         content=unicode_text)

# Per field: (values that are valid, values of any kind). A request is refused
# for its first bad field, so each example draws most fields from the valid
# side and only a few ("broken") from anything; broken-free requests run.
FIELDS = {
    "prompt": (st.one_of(unicode_text.filter(bool).map(lambda t: {"text": t}),
                         st.lists(in_vocab, min_size=1, max_size=40).map(lambda ids: {"token_ids": ids}),
                         st.lists(chat_message, min_size=1, max_size=4).map(lambda m: {"chat": m})),
               st.one_of(st.just({}), st.just({"text": ""}), st.just({"chat": []}),
                         st.lists(any_token, max_size=40).map(lambda ids: {"token_ids": ids}))),
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
        max_tokens=value["max_tokens"], stop=value["stop"],
        top_k=draw(st.one_of(st.just(0), st.integers(0, 2**32 - 1))),
        stop_token_ids=draw(st.lists(any_token, max_size=3)),  # any uint32: they only ever fail to match
        ignore_eos=draw(st.booleans()), logprobs=draw(st.booleans()),
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
        stats = [rt.engine.engine.stats() for rt in suite.decode + suite.prefill]
        if suite.router.router.inflight == 0 and all(
                s.free_blocks == s.total_blocks and s.reserved == s.held == s.running == s.waiting == 0 for s in stats):
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
    await _idle(suite)
