"""The asyncio client: AsyncClient and its per-call ResponseStream."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import grpc

from pdserve.client.errors import Cancelled, error_from_rpc
from pdserve.client.genai_metrics import ClientMetrics
from pdserve.client.messages import Chunk, Completion, build_request
from pdserve.client.retry import NO_RETRY, RECONNECT_OPTIONS, RetryPolicy
from pdserve.common import grpc_tracing
from pdserve.common.auth import bearer
from pdserve.common.security import TLS, dial
from pdserve.v1 import router_pb2, router_pb2_grpc

DEFAULT_TARGET = "localhost:50051"


class ResponseStream:
    """One Generate call: async-iterate it for `Chunk`s. The RPC starts on the
    first `__anext__` (or `async with`) and is cancelled by `aclose()`,
    `cancel()`, leaving `async with`, cancelling the reading task, or
    garbage collection (in CPython: at once when `async for ...: break`
    drops the last reference)."""

    def __init__(
        self,
        stub: router_pb2_grpc.RouterStub,
        request: router_pb2.GenerateRequest,
        timeout: float | None,
        metadata: tuple[tuple[str, str], ...],
        metrics: ClientMetrics | None = None,
        target: str = "",
        retry: RetryPolicy = NO_RETRY,
    ) -> None:
        self.request = request
        self.target = target  # named in errors
        self._stub = stub
        self._timeout = timeout
        self._metadata = metadata
        self._metrics = metrics
        self._retry = retry
        self._call: grpc.aio.UnaryStreamCall | None = None
        self._done = False
        self._t0 = 0.0
        self.attempts = 0  # calls made
        self._streamed = False  # a message arrived: never call again
        self.request_id = request.request_id  # the caller's, else the router's from its first message

    def _start(self) -> grpc.aio.UnaryStreamCall:
        if self._call is None:
            if not self.attempts:
                self._t0 = time.perf_counter()
            self.attempts += 1
            self._call = self._stub.Generate(self.request, timeout=self._remaining(), metadata=self._metadata)
        return self._call

    def _remaining(self) -> float | None:
        """The deadline is the caller's, across every attempt."""
        return None if self._timeout is None else self._timeout - (time.perf_counter() - self._t0)

    async def _again(self, error: grpc.aio.AioRpcError) -> bool:
        """After a failed call: wait and start another if the policy and the deadline allow."""
        if not self._retry.allows(error.code(), self.attempts, self._streamed):
            return False
        wait = self._retry.backoff_s(self.attempts)
        left = self._remaining()
        if left is not None and left <= wait:
            return False
        await asyncio.sleep(wait)
        if self._done:  # cancel() or aclose() while it waited: no new call
            return False
        self._call = None
        self._start()
        return True

    def _measure(self, chunk: Chunk | None, error: grpc.aio.AioRpcError | None = None) -> None:
        """GenAI client metrics, once: at the last message or at the call's error."""
        if self._metrics is None:
            return
        m, self._metrics = self._metrics, None
        attributes = m.attributes(self.request.WhichOneof("prompt") == "chat", self.request.model)
        seconds = time.perf_counter() - self._t0
        if error is not None:
            m.failed(attributes, seconds, error.code().name.lower())
        elif chunk is not None and chunk.usage is not None:
            m.finished(attributes, seconds, chunk.usage.prompt_tokens, chunk.usage.completion_tokens)

    def __aiter__(self) -> ResponseStream:
        return self

    async def __anext__(self) -> Chunk:
        if self._done:
            self.cancel()  # a call still running (cancel() came mid-read) ends here, not at GC
            raise StopAsyncIteration
        try:
            while True:
                try:
                    response = await self._start().read()
                    break
                except grpc.aio.AioRpcError as e:
                    if not await self._again(e):
                        raise
        except grpc.aio.AioRpcError as e:
            if self._done:  # cancelled while waiting to retry: the loop just ends
                raise StopAsyncIteration from None
            self._done = True
            self._measure(None, e)
            raise error_from_rpc(e, self.request_id, self.target, self.attempts, self._streamed) from None
        except asyncio.CancelledError:
            by_us = self._done  # cancel() was called (from another task)
            self.cancel()  # our task was cancelled: tell the server now, not at GC
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            if by_us:
                raise StopAsyncIteration from None
            raise Cancelled("cancelled locally (client closed?)", request_id=self.request_id) from None
        except grpc.aio.UsageError:  # the client's channel was closed under it
            self.cancel()
            raise Cancelled("the client was closed", request_id=self.request_id) from None
        except BaseException:
            self.cancel()
            raise
        if response is grpc.aio.EOF:
            self._done = True
            raise StopAsyncIteration
        self._streamed = True
        self.request_id = self.request_id or response.request_id  # errors name what the router logs
        chunk = Chunk.from_proto(response)
        if chunk.finish_reason is not None:
            self._measure(chunk)
        return chunk

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
        try:
            self._start()
        except grpc.aio.UsageError:
            raise Cancelled("the client is closed", request_id=self.request_id) from None
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
    paths (cert and key: a client certificate, for routers that require one);
    `meter_provider`: where the GenAI client metrics go (default: OpenTelemetry's
    global provider, which keeps nothing unless the application set one);
    `retry`: when a call failed UNAVAILABLE before its first token is made again
    (RetryPolicy; None: never)."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float | None = None,
        metadata: Mapping[str, str] | Iterable[tuple[str, str]] | None = None,
        options: Sequence[tuple[str, Any]] = (),
        api_key: str | None = None,
        tls: TLS | bool | None = None,
        meter_provider: Any = None,
        retry: RetryPolicy | None = RetryPolicy(),
    ) -> None:
        self.target = target
        self.timeout = timeout
        self.retry = retry or NO_RETRY
        self._metrics = ClientMetrics(meter_provider, target)
        items = metadata.items() if isinstance(metadata, Mapping) else (metadata or ())
        api_key = os.environ.get("PDSERVE_API_KEY") if api_key is None else api_key
        self.metadata = tuple((k, v) for k, v in items) + bearer(api_key)
        self._channel = dial(
            target,
            TLS() if tls is True else tls or None,
            interceptors=grpc_tracing.client_interceptors(always=True),
            options=[("grpc.max_receive_message_length", 64 * 2**20), *RECONNECT_OPTIONS, *options],
        )
        self._stub = router_pb2_grpc.RouterStub(self._channel)

    def generate(
        self,
        prompt: str | Sequence[int] | None = None,
        *,
        messages: Iterable[Mapping[str, str]] | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int = 0,
        seed: int | None = None,
        stop: str | Iterable[str] = (),
        stop_token_ids: Iterable[int] = (),
        ignore_eos: bool = False,
        logprobs: bool = False,
        request_id: str = "",
        model: str = "",
        timeout: float | None = None,
    ) -> ResponseStream:
        """Stream a completion of `prompt` (text, or token ids) or of chat `messages`
        ([{"role": ..., "content": ...}]). Unset sampling fields take the server's
        defaults; temperature=0 is greedy. `timeout` (s) overrides the client's."""
        request = build_request(
            prompt,
            messages=messages,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            stop=stop,
            stop_token_ids=stop_token_ids,
            ignore_eos=ignore_eos,
            logprobs=logprobs,
            request_id=request_id,
            model=model,
        )
        return ResponseStream(
            self._stub,
            request,
            self.timeout if timeout is None else timeout,
            self.metadata,
            self._metrics,
            self.target,
            self.retry,
        )

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
