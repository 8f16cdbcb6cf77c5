"""What the SDK sends and receives: the request builder, and Chunk / Completion."""

from __future__ import annotations

import numbers
import operator
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.descriptor import FieldDescriptor

from pdserve.client.errors import InvalidArgument
from pdserve.common.engine.sampling_params import without_vllm_offs
from pdserve.common.records import Usage
from pdserve.v1 import common_pb2, router_pb2

_FINISH = {
    common_pb2.FINISH_REASON_STOP: "stop",
    common_pb2.FINISH_REASON_LENGTH: "length",
    common_pb2.FINISH_REASON_ABORT: "abort",
    common_pb2.FINISH_REASON_ERROR: "error",
}


@dataclass(frozen=True)
class Timing:
    queued_ms: float
    prefill_ms: float
    kv_transfer_ms: float
    decode_ms: float
    ttft_ms: float
    total_ms: float


@dataclass(frozen=True)
class Chunk:
    """One streamed message; only the last has finish_reason, usage, timing, route."""

    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: str | None = None  # "stop", "length", "abort", "error"
    usage: Usage | None = None
    timing: Timing | None = None
    route: dict[str, Any] | None = None  # prefill_worker_id, decode_worker_id, disaggregated
    logprobs: list[float] = field(default_factory=list)

    @classmethod
    def from_proto(cls, r: router_pb2.GenerateResponse) -> Chunk:
        u, t, route = r.usage, r.timing, r.route
        return cls(
            request_id=r.request_id,
            token_ids=list(r.token_ids),
            text=r.text,
            finish_reason=_FINISH.get(r.finish_reason),
            logprobs=list(r.logprobs),
            usage=Usage(u.prompt_tokens, u.completion_tokens, u.cached_tokens) if r.HasField("usage") else None,
            timing=Timing(t.queued_ms, t.prefill_ms, t.kv_transfer_ms, t.decode_ms, t.ttft_ms, t.total_ms)
            if r.HasField("timing")
            else None,
            route={
                "prefill_worker_id": route.prefill_worker_id,
                "decode_worker_id": route.decode_worker_id,
                "disaggregated": route.disaggregated,
            }
            if r.HasField("route")
            else None,
        )


@dataclass(frozen=True)
class Completion:
    """A whole completion: the chunks' text and tokens joined, plus the final metadata."""

    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str | None
    usage: Usage | None
    timing: Timing | None
    route: dict[str, Any] | None
    logprobs: list[float] = field(default_factory=list)

    @classmethod
    def from_chunks(cls, chunks: Sequence[Chunk]) -> Completion:
        last = chunks[-1] if chunks else Chunk("", [], "")
        return cls(
            last.request_id,
            "".join(c.text for c in chunks),
            [t for c in chunks for t in c.token_ids],
            last.finish_reason,
            last.usage,
            last.timing,
            last.route,
            [p for c in chunks for p in c.logprobs],
        )


def build_request(
    prompt: str | Sequence[int] | None = None,
    *,
    messages: Iterable[Mapping[str, str]] | None = None,
    request_id: str = "",
    model: str = "",
    **sampling: Any,
) -> router_pb2.GenerateRequest:
    """A GenerateRequest; `sampling` takes SamplingParams' fields. Bad arguments
    raise InvalidArgument naming the field (`max_tokens`, `stop[0]`,
    `messages[0].content`) before any RPC is made."""
    if (prompt is None) == (messages is None):
        raise _invalid("prompt", "give exactly one of prompt or messages")
    req = router_pb2.GenerateRequest(request_id=request_id, model=model)
    if isinstance(prompt, str):
        req.text = prompt
    elif prompt is not None:
        req.token_ids.SetInParent()  # an empty list still selects the oneof
        req.token_ids.ids.extend(
            _wire(f"prompt[{i}]", t, _F.TYPE_UINT32)
            for i, t in enumerate(_items("prompt", prompt, "a string or a list of token ids"))
        )
    else:
        req.chat.SetInParent()
        req.chat.messages.extend(
            _chat_message(i, m)
            for i, m in enumerate(_items("messages", messages, 'a list of {"role": ..., "content": ...} mappings'))
        )
    for name, value in sampling.items():
        field = _SAMPLING.get(name)
        if field is None:
            raise TypeError(f"unknown sampling parameter {name!r}")
        value = without_vllm_offs(name, value)  # top_k=-1, seed=-1: off, as over HTTP
        if value is None:  # leave unset: the server's default applies
            continue
        if field.is_repeated:  # stop takes one string too
            what = "a string or a list of strings" if field.type == _F.TYPE_STRING else "a list of integers"
            values = _items(name, [value] if isinstance(value, str) else value, what)
            getattr(req.sampling, name).extend(_wire(f"{name}[{i}]", v, field.type) for i, v in enumerate(values))
        else:
            setattr(req.sampling, name, _wire(name, value, field.type, _LOWEST.get(name, 0)))
    return req


# -- argument checks, before protobuf's own (whose messages name no field) ---
_F = FieldDescriptor
_SAMPLING = common_pb2.SamplingParams.DESCRIPTOR.fields_by_name
_UINT_BITS = {_F.TYPE_UINT32: 32, _F.TYPE_UINT64: 64}
_LOWEST = {"max_tokens": 1}  # a request for no token is refused by the router too (SamplingParams)


def _invalid(field: str, reason: str) -> InvalidArgument:
    """As the server words it: details "field: reason", and .field."""
    return InvalidArgument(f"{field}: {reason}", field=field)


def _items(field: str, value: Any, what: str) -> list:
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
        raise _invalid(field, f"must be {what}, got {value!r}")
    return list(value)


def _wire(field: str, value: Any, kind: int, low: int = 0) -> Any:
    """`value` if a protobuf field of type `kind` carries it, else InvalidArgument naming `field`."""
    if kind in _UINT_BITS:
        bits = _UINT_BITS[kind]
        try:  # any integer type (numpy's, a 0-d tensor's) but bool
            ok = not isinstance(value, bool) and low <= operator.index(value) < 2**bits
        except TypeError:
            ok = False
        if not ok:
            raise _invalid(field, f"must be an integer in [{low}, 2**{bits}), got {value!r}")
        return value
    ok, what = {
        _F.TYPE_FLOAT: (isinstance(value, numbers.Real) and not isinstance(value, bool), "a number"),
        _F.TYPE_BOOL: (isinstance(value, bool), "True or False"),
        _F.TYPE_STRING: (isinstance(value, str), "a string"),
    }[kind]
    if not ok:
        raise _invalid(field, f"must be {what}, got {value!r}")
    return value


def _chat_message(i: int, message: Any) -> router_pb2.ChatMessage:
    if not isinstance(message, Mapping):
        raise _invalid(f"messages[{i}]", f'must be a {{"role": ..., "content": ...}} mapping, got {message!r}')
    for key in ("role", "content"):
        if key not in message:
            raise _invalid(f"messages[{i}].{key}", "is missing: each message needs a role and a content string")
        _wire(f"messages[{i}].{key}", message[key], _F.TYPE_STRING)
    return router_pb2.ChatMessage(role=message["role"], content=message["content"])
