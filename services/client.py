"""The pdserve client SDK: stream completions from the router's Generate RPC.

    async with AsyncClient("localhost:50051") as client:
        async with client.stream("Hello", max_tokens=32) as stream:
            async for chunk in stream:
                print(chunk.text, end="")

Leaving a stream early cancels its gRPC call, so the router cancels every
downstream RPC and frees the request's KV blocks. `Client` is the synchronous
twin. Failures raise PdserveClientError subclasses. Guide: docs/client.md.
"""
from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from pdserve.common import grpc_tracing
from pdserve.common.security import TLS, dial
from pdserve.v1 import common_pb2, router_pb2, router_pb2_grpc

DEFAULT_TARGET = "localhost:50051"
_FINISH = {common_pb2.FINISH_REASON_STOP: "stop", common_pb2.FINISH_REASON_LENGTH: "length",
           common_pb2.FINISH_REASON_ABORT: "abort", common_pb2.FINISH_REASON_ERROR: "error"}


class PdserveClientError(Exception):
    """A failed call. `code`: the gRPC status; `field`: the offending request
    field (INVALID_ARGUMENT only); `error_type`: the server's exception name."""

    status: grpc.StatusCode | None = None
    retryable = False  # True: the same request may succeed later or elsewhere

    def __init__(self, details: str, *, code: grpc.StatusCode | None = None, field: str | None = None,
                 error_type: str | None = None, request_id: str = "") -> None:
        super().__init__(details)
        self.code, self.details, self.field = code or self.status, details, field
        self.error_type, self.request_id = error_type, request_id

    def __str__(self) -> str:
        code = self.code.name if self.code else "ERROR"
        return f"{code}: {self.details}" + (f" [field {self.field}]" if self.field else "")


class InvalidArgument(PdserveClientError, ValueError):
    status = grpc.StatusCode.INVALID_ARGUMENT


class ResourceExhausted(PdserveClientError):
    status, retryable = grpc.StatusCode.RESOURCE_EXHAUSTED, True


class Unavailable(PdserveClientError):
    status, retryable = grpc.StatusCode.UNAVAILABLE, True


class Aborted(PdserveClientError):
    """A KV transfer failed; retrying the whole request is safe."""
    status, retryable = grpc.StatusCode.ABORTED, True


class DeadlineExceeded(PdserveClientError, TimeoutError):
    status = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(PdserveClientError):
    """Cancelled by the server (shutting down) or by closing the client mid-stream;
    a stream you cancel or leave yourself just ends."""
    status = grpc.StatusCode.CANCELLED


class Internal(PdserveClientError):
    status = grpc.StatusCode.INTERNAL


class Unauthenticated(PdserveClientError):
    """No API key, or a wrong one (`api_key=` / PDSERVE_API_KEY)."""
    status = grpc.StatusCode.UNAUTHENTICATED


_ERRORS = {cls.status: cls for cls in (InvalidArgument, ResourceExhausted, Unavailable, Aborted,
                                       DeadlineExceeded, Cancelled, Internal, Unauthenticated)}


def error_from_rpc(exc: grpc.aio.AioRpcError | grpc.RpcError, request_id: str = "") -> PdserveClientError:
    """The SDK exception for a failed RPC, using pdserve's trailing metadata."""
    trailers = dict(exc.trailing_metadata() or ())
    cls = _ERRORS.get(exc.code(), PdserveClientError)
    return cls(exc.details() or "", code=exc.code(), field=trailers.get("pdserve-error-field"),
               error_type=trailers.get("pdserve-error-type"), request_id=request_id)


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


class ResponseStream:
    """One Generate call: async-iterate it for `Chunk`s. The RPC starts on the
    first `__anext__` (or `async with`) and is cancelled by `aclose()`,
    `cancel()`, leaving `async with`, cancelling the reading task, or
    garbage collection (in CPython: at once when `async for ...: break`
    drops the last reference)."""

    def __init__(self, stub: router_pb2_grpc.RouterStub, request: router_pb2.GenerateRequest,
                 timeout: float | None, metadata: tuple[tuple[str, str], ...]) -> None:
        self.request = request
        self._stub, self._timeout, self._metadata = stub, timeout, metadata
        self._call: grpc.aio.UnaryStreamCall | None = None
        self._done = False

    def _start(self) -> grpc.aio.UnaryStreamCall:
        if self._call is None:
            self._call = self._stub.Generate(self.request, timeout=self._timeout, metadata=self._metadata)
        return self._call

    def __aiter__(self) -> ResponseStream:
        return self

    async def __anext__(self) -> Chunk:
        if self._done:
            raise StopAsyncIteration
        call = self._start()
        try:
            response = await call.read()
        except grpc.aio.AioRpcError as e:
            self._done = True
            raise error_from_rpc(e, self.request.request_id) from None
        except asyncio.CancelledError:
            by_us = self._done  # cancel() was called (from another task)
            self.cancel()  # our task was cancelled: tell the server now, not at GC
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            if by_us:
                raise StopAsyncIteration from None
            raise Cancelled("cancelled locally (client closed?)", request_id=self.request.request_id) from None
        except BaseException:
            self.cancel()
            raise
        if response is grpc.aio.EOF:
            self._done = True
            raise StopAsyncIteration
        return Chunk.from_proto(response)

    def cancel(self) -> None:
        """Stop now: cancels the RPC (a no-op once it has finished)."""
        self._done = True
        if self._call is not None and not self._call.done():
            self._call.cancel()

    async def aclose(self) -> None:
        self.cancel()

    async def collect(self) -> Completion:
        """Read the rest of the stream into one Completion."""
        async with self:
            return Completion.from_chunks([chunk async for chunk in self])

    async def __aenter__(self) -> ResponseStream:
        self._start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.cancel()

    def __del__(self) -> None:
        if getattr(self, "_call", None) is not None and not self._call.done():
            self._call.cancel()


class AsyncClient:
    """An asyncio client of one router. `timeout`: default deadline of each call
    in seconds (None: none); `metadata`: sent with every call; `api_key`: sent as
    `authorization: Bearer` (default: $PDSERVE_API_KEY); `tls`: True for TLS
    verified by the system's roots, or a `TLS(ca=..., cert=..., key=...)` of PEM
    paths (cert and key: a client certificate, for routers that require one)."""

    def __init__(self, target: str = DEFAULT_TARGET, *, timeout: float | None = None,
                 metadata: Mapping[str, str] | Iterable[tuple[str, str]] | None = None,
                 options: Sequence[tuple[str, Any]] = (), api_key: str | None = None,
                 tls: TLS | bool | None = None) -> None:
        self.target, self.timeout = target, timeout
        items = metadata.items() if isinstance(metadata, Mapping) else (metadata or ())
        api_key = os.environ.get("PDSERVE_API_KEY") if api_key is None else api_key
        auth = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self.metadata = tuple((k, v) for k, v in items) + auth
        self._channel = dial(target, TLS() if tls is True else tls or None, interceptors=grpc_tracing.client_interceptors(always=True),
                             options=[("grpc.max_receive_message_length", 64 * 2**20), *options])
        self._stub = router_pb2_grpc.RouterStub(self._channel)

    def generate(self, prompt: str | Sequence[int] | None = None, *,
                 messages: Iterable[Mapping[str, str]] | None = None, max_tokens: int | None = None,
                 temperature: float | None = None, top_p: float | None = None, top_k: int = 0,
                 seed: int | None = None, stop: str | Iterable[str] = (), stop_token_ids: Iterable[int] = (),
                 ignore_eos: bool = False, logprobs: bool = False, request_id: str = "", model: str = "",
                 timeout: float | None = None) -> ResponseStream:
        """Stream a completion of `prompt` (text, or token ids) or of chat `messages`
        ([{"role": ..., "content": ...}]). Unset sampling fields take the server's
        defaults; temperature=0 is greedy. `timeout` (s) overrides the client's."""
        request = build_request(prompt, messages=messages, max_tokens=max_tokens, temperature=temperature,
                                top_p=top_p, top_k=top_k, seed=seed, stop=stop, stop_token_ids=stop_token_ids,
                                ignore_eos=ignore_eos, logprobs=logprobs, request_id=request_id, model=model)
        return ResponseStream(self._stub, request, self.timeout if timeout is None else timeout, self.metadata)

    stream = generate  # reads better as `async with client.stream(...) as s:`

    async def complete(self, prompt: str | Sequence[int] | None = None, **params: Any) -> Completion:
        """The whole completion at once."""
        return await self.generate(prompt, **params).collect()

    async def close(self) -> None:
        """Close the channel; cancels calls still running."""
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


class Client:
    """Synchronous client: an AsyncClient on an event loop in a background
    thread, so it works in plain scripts, notebooks with a running loop, and
    from several threads at once."""

    def __init__(self, target: str = DEFAULT_TARGET, *, timeout: float | None = None,
                 metadata: Mapping[str, str] | Iterable[tuple[str, str]] | None = None,
                 api_key: str | None = None, tls: TLS | bool | None = None) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="pdserve-client", daemon=True)
        self._thread.start()

        async def make() -> AsyncClient:  # the channel must be created on its loop
            return AsyncClient(target, timeout=timeout, metadata=metadata, api_key=api_key, tls=tls)
        self._client = self._run(make())

    def _run(self, coro: Any) -> Any:
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()  # e.g. KeyboardInterrupt while waiting: cancels the RPC too
            raise

    def generate(self, prompt: str | Sequence[int] | None = None, **params: Any) -> SyncResponseStream:
        """As AsyncClient.generate, as a plain iterator and context manager."""
        return SyncResponseStream(self, self._client.generate(prompt, **params))

    stream = generate

    def complete(self, prompt: str | Sequence[int] | None = None, **params: Any) -> Completion:
        return self._run(self._client.complete(prompt, **params))

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self._run(self._client.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class SyncResponseStream:
    """Iterator of Chunks; `close()`, leaving `with`, or dropping it cancels the call."""

    def __init__(self, client: Client, stream: ResponseStream) -> None:
        self._loop, self._run, self._stream = client._loop, client._run, stream

    def __iter__(self) -> SyncResponseStream:
        return self

    def __next__(self) -> Chunk:
        try:
            return self._run(self._stream.__anext__())
        except StopAsyncIteration:
            raise StopIteration from None

    def close(self) -> None:
        if not self._loop.is_closed():
            self._run(self._stream.aclose())

    def __enter__(self) -> SyncResponseStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        # Never block here (GC may run on the loop's own thread): schedule the
        # cancel, which also makes the stream's last reference die on its loop.
        if not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._stream.cancel)
