"""The router's OpenAI-compatible HTTP API (aiohttp, on the gRPC server's loop): every
generation goes through `Router.generate`, as gRPC Generate does. Endpoints, errors,
disconnects and shutdown: docs/openai.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from aiohttp import web

from pdserve.common import genai, tracing
from pdserve.common.errors import NotReadyError, UnauthenticatedError
from pdserve.common.ports import host_port
from pdserve.common.security import ApiKeys
from pdserve.router.cors import Cors
from pdserve.router.models import ModelNotFoundError, check_model, served_models
from pdserve.router.openai_errors import (
    JsonErrorRunner,
    decode_json,
    error_body,
    error_payload,
    error_response,
    openai_errors,
    read_body,
)
from pdserve.router.openai_protocol import Kind, OpenAIRequest, ResponseShaper, parse_request
from pdserve.router.request_metrics import RequestMetrics
from pdserve.router.router import Event, Router
from pdserve.router.shutdown import Shutdown

__all__ = ["ModelNotFoundError", "OpenAIServer", "error_response"]
# Long prompts sent as token-id lists fit; a larger body is refused with 413
# (Content Too Large) before it is read.
MAX_BODY_BYTES = 16 * 2**20
_PARSE_ON_LOOP_BYTES = 256 << 10
_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}


def api_key_auth(keys: ApiKeys):
    """401 for /v1/* without a valid `Authorization: Bearer <key>`; /health stays
    open for probes. Before the body is read: a refused client costs nothing."""

    @web.middleware
    async def check(request: web.Request, handler) -> web.StreamResponse:
        if request.path != "/health":
            try:
                keys.check(request.headers.get("Authorization"))
            except UnauthenticatedError as e:
                return error_response(e)
        return await handler(request)

    return check


class OpenAIServer:
    """The HTTP server; port -1 disables it, 0 takes any free port (see `port` after start).
    `shutdown` is shared with the gRPC front end: one drain refuses and cuts both."""

    def __init__(
        self,
        router: Router,
        host: str,
        port: int,
        *,
        default_max_tokens: int,
        ready: Callable[[], bool],
        shutdown: Shutdown | None = None,
        api_keys: ApiKeys | None = None,
        allowed_origins: list[str] | None = None,
        ssl_context: ssl.SSLContext | None = None,
        request_metrics: RequestMetrics | None = None,
    ):
        self.router = router
        self.host = host
        self.requested_port = port
        self.measured = request_metrics or RequestMetrics()
        self.ssl_context = ssl_context  # HTTPS when given
        self.default_max_tokens = default_max_tokens
        self.ready = ready
        self.shutdown = shutdown or Shutdown()
        self.port: int | None = None
        self.created = int(time.time())
        self._runner: web.AppRunner | None = None
        auth = [api_key_auth(api_keys)] if api_keys else []
        self.app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[openai_errors, *auth])
        self.app.add_routes(
            [
                web.post("/v1/completions", self._completions),
                web.post("/v1/chat/completions", self._chat),
                web.get("/v1/models", self._models),
                web.get("/v1/models/{model:.+}", self._model),  # ids may hold slashes: org/name
                web.get("/health", self._health),
            ]
        )
        if allowed_origins:
            Cors(allowed_origins).install(self.app)

    @property
    def url(self) -> str | None:
        scheme = "https" if self.ssl_context else "http"
        return f"{scheme}://{host_port(self.host, self.port)}/v1" if self.port is not None else None

    async def start(self) -> None:
        if self.requested_port < 0:
            return
        # handler_cancellation: a client that goes away cancels its handler,
        # and so its router generator, instead of generating for nobody.
        # The grace period is ours (Shutdown.drain); aiohttp's own would wait up to twice its timeout.
        self._runner = JsonErrorRunner(self.app, handler_cancellation=True, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.requested_port, ssl_context=self.ssl_context).start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        """Drain (a no-op once the router has drained), stop listening, close the connections."""
        if self._runner is None:
            return
        await self.shutdown.drain()
        await self._runner.cleanup()
        self._runner = self.port = None

    async def _health(self, request: web.Request) -> web.Response:
        ok = self.ready() and not self.shutdown.draining
        return web.json_response({"status": "ok" if ok else "unavailable"}, status=200 if ok else 503)

    def _model_object(self, name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": self.created, "owned_by": "pdserve"}

    async def _models(self, request: web.Request) -> web.Response:
        data = [self._model_object(m) for m in served_models(self.router.pool)]
        return web.json_response({"object": "list", "data": data})

    async def _model(self, request: web.Request) -> web.Response:
        name = request.match_info["model"]
        if name not in served_models(self.router.pool):  # OpenAI's answer for an unknown id
            message = f"The model `{name}` does not exist"
            return web.json_response(
                error_body(message, "invalid_request_error", "model", "model_not_found"), status=404
            )
        return web.json_response(self._model_object(name))

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "completion")

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "chat")

    async def _generate(self, request: web.Request, kind: Kind) -> web.StreamResponse:
        with tracing.remote_parent(request.headers):  # a caller's traceparent: its trace goes on here
            return await self._answer(request, kind)

    async def _parse(self, request: web.Request, kind: Kind) -> OpenAIRequest:
        raw, charset = await read_body(request), request.charset

        def parse() -> OpenAIRequest:
            return parse_request(kind, decode_json(raw, charset), self.default_max_tokens)

        # A large body decodes off the event loop: 16 MiB of token ids took ~0.25 s, a stall of every
        # stream's tokens (the router relays them all on this loop).
        return parse() if len(raw) <= _PARSE_ON_LOOP_BYTES else await asyncio.to_thread(parse)

    async def _answer(self, request: web.Request, kind: Kind) -> web.StreamResponse:
        stream: web.StreamResponse | None = None  # once its headers are out, errors go inside it
        sent = False  # the whole stream, [DONE] and its end included
        headers: dict[str, str] = {}  # the request's id, once it has one
        try:
            async with self.shutdown.scope():  # cut at the grace's end: ShuttingDownError
                with self.measured.refusals():
                    self.shutdown.admit()
                    req = await self._parse(request, kind)
                    check_model(self.router.pool, req.model)
                    # As vLLM's --enable-request-id-headers: the client's id in logs, traces and the reply.
                    req.input.request_id = request.headers.get("X-Request-Id", req.input.request_id)
                headers = {"X-Request-Id": req.input.request_id}
                # Its model: the one named, or the one served.
                attributes = self.router.genai_attributes(req.input)
                shaper = ResponseShaper(kind, attributes[genai.REQUEST_MODEL], req.input.request_id, req.include_usage)
                events = self.measured.observe(self.router.generate(req.input), attributes)
                async with contextlib.aclosing(events):  # closing it cancels downstream calls
                    # Errors up to the first token (validation, capacity, no worker)
                    # get a real status code; only later ones arrive inside the stream.
                    first = await anext(events)
                    if req.stream:
                        stream = web.StreamResponse(headers={**_SSE_HEADERS, **headers})
                        await stream.prepare(request)
                        await _send(stream, _sse_chunks(shaper, first, events))
                        sent = True
                        return stream
                    text, last = first.text, first
                    async for last in events:
                        text += last.text
                    return web.json_response(shaper.full(text, last.finish_reason.value, last.usage), headers=headers)
        except web.HTTPException:
            raise  # e.g. body too large: the middleware shapes it
        except Exception as e:  # CancelledError (client gone) is a BaseException: not caught
            if stream is None or not stream.prepared:
                return error_response(e, kind, headers)
            if not sent:  # cut mid-stream: the stream says why it ends
                await _send(stream, _last_words(e))
            return stream


async def _send(stream: web.StreamResponse, chunks: AsyncIterator[Any]) -> None:
    """Write server-sent events, then end the response; a client gone meanwhile is no error
    (the caller's aclosing() cancels downstream)."""
    try:
        async with contextlib.aclosing(chunks):
            async for obj in chunks:
                data = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"))
                await stream.write(f"data: {data}\n\n".encode())
        await stream.write_eof()
    except ConnectionError:
        pass


async def _last_words(exc: Exception) -> AsyncIterator[Any]:
    yield error_payload(exc)[1]
    yield "[DONE]"


async def _sse_chunks(shaper: ResponseShaper, first: Event, events: AsyncIterator[Event]) -> AsyncIterator[Any]:
    """The stream's chunks, then "[DONE]"; a failure after the headers went out
    is reported inside the stream, as OpenAI does."""
    try:
        if shaper.kind == "chat":
            yield shaper.chunk(None, role=True)
        ev: Event | None = first
        while ev is not None:
            if ev.text:
                yield shaper.chunk(ev.text)
            if ev.finish_reason is not None:
                yield shaper.chunk(None, ev.finish_reason.value)
                if shaper.include_usage:
                    yield shaper.usage_chunk(ev.usage)
                break
            ev = await anext(events, None)
        if ev is None:
            raise NotReadyError("the stream ended without a finish reason")
    except Exception as e:
        yield error_payload(e)[1]
    yield "[DONE]"
