"""What the SDK sends and receives: the request builder, and Chunk / Completion."""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pdserve.client.errors import InvalidArgument
from pdserve.v1 import common_pb2, router_pb2

_FINISH = {common_pb2.FINISH_REASON_STOP: "stop", common_pb2.FINISH_REASON_LENGTH: "length",
           common_pb2.FINISH_REASON_ABORT: "abort", common_pb2.FINISH_REASON_ERROR: "error"}


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0


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
            request_id=r.request_id, token_ids=list(r.token_ids), text=r.text,
            finish_reason=_FINISH.get(r.finish_reason), logprobs=list(r.logprobs),
            usage=Usage(u.prompt_tokens, u.completion_tokens, u.cached_tokens) if r.HasField("usage") else None,
            timing=Timing(t.queued_ms, t.prefill_ms, t.kv_transfer_ms, t.decode_ms, t.ttft_ms, t.total_ms)
            if r.HasField("timing") else None,
            route={"prefill_worker_id": route.prefill_worker_id, "decode_worker_id": route.decode_worker_id,
                   "disaggregated": route.disaggregated} if r.HasField("route") else None)


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
        return cls(last.request_id, "".join(c.text for c in chunks), [t for c in chunks for t in c.token_ids],
                   last.finish_reason, last.usage, last.timing, last.route, [p for c in chunks for p in c.logprobs])


def build_request(prompt: str | Sequence[int] | None = None, *, messages: Iterable[Mapping[str, str]] | None = None,
                  request_id: str = "", model: str = "", **sampling: Any) -> router_pb2.GenerateRequest:
    """A GenerateRequest; `sampling` takes SamplingParams' fields. Bad arguments
    raise InvalidArgument (with .field) before any RPC is made."""
    if (prompt is None) == (messages is None):
        raise InvalidArgument("give exactly one of prompt or messages", field="prompt")
    req = router_pb2.GenerateRequest(request_id=request_id, model=model)
    try:
        if isinstance(prompt, str):
            req.text = prompt
        elif prompt is not None:
            req.token_ids.SetInParent()  # an empty list still selects the oneof
            req.token_ids.ids.extend(prompt)
        else:
            req.chat.SetInParent()
            req.chat.messages.extend(router_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in messages)
    except (TypeError, ValueError, KeyError) as e:
        raise InvalidArgument(f"bad prompt: {e!s}", field="messages" if messages is not None else "prompt") from None
    for name, value in sampling.items():
        try:
            if name in ("stop", "stop_token_ids"):  # repeated fields
                getattr(req.sampling, name).extend([value] if isinstance(value, str) else value)
            elif value is not None:  # None: leave unset, the server's default applies
                setattr(req.sampling, name, value)
        except (TypeError, ValueError) as e:  # protobuf's range and type checks
            raise InvalidArgument(str(e), field=name) from None  # the router's field names
        except AttributeError:
            raise TypeError(f"unknown sampling parameter {name!r}") from None
    return req
