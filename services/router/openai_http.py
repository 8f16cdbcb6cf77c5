"""The OpenAI-compatible HTTP API of the router (aiohttp, on the gRPC server's loop).

POST /v1/completions and /v1/chat/completions (plain or server-sent events),
GET /v1/models and GET /health. Every generation goes through
`Router.generate`, as the gRPC Generate does: one validation, one routing and
one cancellation path. Request bodies are translated by `openai_protocol`.

A client that disconnects cancels its handler (handler_cancellation), and the
router generator is closed with it, which cancels every downstream call. On
shutdown, running generations get the router's grace period, then the same.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import web

from pdserve.common import genai, tracing
from pdserve.common.errors import CapacityExhaustedError, InvalidRequestError, NotReadyError, UnauthenticatedError
from pdserve.common.security import ApiKeys
from pdserve.router.models import ModelNotFoundError, check_model, served_models
from pdserve.router.openai_protocol import Kind, ResponseShaper, parse_request
from pdserve.router.request_metrics import RequestMetrics
from pdserve.router.router import Event, Router

log = logging.getLogger(__name__)
# Long prompts sent as token-id lists fit; a larger body is refused with 413
# (Content Too Large) before it is read.
MAX_BODY_BYTES = 16 * 2**20


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(exc: BaseException, kind: Kind | None = None) -> web.Response:
    """OpenAI's error shape and status for an exception; internals never leak."""
    if isinstance(exc, ModelNotFoundError):  # OpenAI's status for it, not 400
        status, body = 404, error_body(str(exc), "invalid_request_error", "model", "model_not_found")
    elif isinstance(exc, InvalidRequestError):
        param, message = exc.field, str(exc)
        if param.startswith("prompt"):  # the router's names for the prompt: prompt, prompt.chat, ...
            param = "messages" if kind == "chat" else "prompt"
            message = f"{param}: {exc.reason}"  # in the API's own names
        param = None if param == "body" else param
        status, body = 400, error_body(message, "invalid_request_error", param)
    elif isinstance(exc, CapacityExhaustedError):
        status, body = 429, error_body(str(exc), "requests", None, "rate_limit_exceeded")
    elif isinstance(exc, UnauthenticatedError):
        return web.json_response(error_body(str(exc), "invalid_request_error", None, "invalid_api_key"),
                                 status=401, headers={"WWW-Authenticate": "Bearer"})
    elif isinstance(exc, NotReadyError):
        status, body = 503, error_body(str(exc), "server_error", None, "service_unavailable")
    else:
        incident = uuid.uuid4().hex[:12]
        log.error("HTTP request failed (incident %s)", incident, exc_info=exc)
        status, body = 500, error_body(f"internal error (incident {incident})", "server_error")
    return web.json_response(body, status=status)


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


@web.middleware
async def openai_errors(request: web.Request, handler) -> web.StreamResponse:
    """aiohttp's own errors (unknown path, wrong method, body too large) in OpenAI's shape."""
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        message = f"{e.reason}: {request.method} {request.path}"
        return web.json_response(error_body(message, "invalid_request_error"), status=e.status)


class OpenAIServer:
    """The HTTP server; port -1 disables it, 0 takes any free port (see `port` after start)."""

    def __init__(self, router: Router, host: str, port: int, *, default_max_tokens: int,
                 ready: Callable[[], bool], shutdown_timeout_s: float = 10.0,
                 api_keys: ApiKeys | None = None, ssl_context: ssl.SSLContext | None = None,
                 request_metrics: RequestMetrics | None = None):
        self.router, self.host, self.requested_port = router, host, port
        self.measured = request_metrics or RequestMetrics()
        self.ssl_context = ssl_context  # HTTPS when given
        self.default_max_tokens, self.ready, self.shutdown_timeout_s = default_max_tokens, ready, shutdown_timeout_s
        self.port: int | None = None
        self.draining = False
        self.created = int(time.time())
        self._runner: web.AppRunner | None = None
        self._inflight: set[asyncio.Task] = set()  # generation handlers, for the shutdown grace
        self._drained: asyncio.Task | None = None
        auth = [api_key_auth(api_keys)] if api_keys else []
        self.app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[openai_errors, *auth])
        self.app.add_routes([
            web.post("/v1/completions", self._completions),
            web.post("/v1/chat/completions", self._chat),
            web.get("/v1/models", self._models),
            web.get("/health", self._health),
        ])

    @property
    def url(self) -> str | None:
        scheme = "https" if self.ssl_context else "http"
        return f"{scheme}://{self.host}:{self.port}/v1" if self.port is not None else None

    async def start(self) -> None:
        if self.requested_port < 0:
            return
        # handler_cancellation: a client that goes away cancels its handler,
        # and so its router generator, instead of generating for nobody.
        # The grace period is ours (drain); aiohttp's own would wait up to twice its timeout.
        self._runner = web.AppRunner(self.app, handler_cancellation=True, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.requested_port, ssl_context=self.ssl_context).start()
        self.port = self._runner.addresses[0][1]

    async def drain(self) -> None:
        """Begin a graceful stop (SIGTERM): stop listening, answer 503 on open
        connections, and give running generations shutdown_timeout_s to finish."""
        if self._runner is not None and self._drained is None:
            self.draining = True
            self._drained = asyncio.create_task(self._drain(self._runner))

    async def _drain(self, runner: web.AppRunner) -> None:
        for site in runner.sites:
            await site.stop()
        if self._inflight:
            await asyncio.wait(set(self._inflight), timeout=self.shutdown_timeout_s)

    async def stop(self) -> None:
        """Drain (if not begun yet) and wait for it; generations still running
        then are cancelled, which cancels their downstream calls."""
        if self._runner is None:
            return
        await self.drain()
        await self._drained
        late = set(self._inflight)
        for task in late:
            task.cancel()
        if late:
            await asyncio.wait(late, timeout=10)  # their cleanup releases KV reservations
        await self._runner.cleanup()
        self._runner = self._drained = self.port = None

    async def _health(self, request: web.Request) -> web.Response:
        ok = self.ready() and not self.draining
        return web.json_response({"status": "ok" if ok else "unavailable"}, status=200 if ok else 503)

    async def _models(self, request: web.Request) -> web.Response:
        data = [{"id": m, "object": "model", "created": self.created, "owned_by": "pdserve"}
                for m in served_models(self.router.pool)]
        return web.json_response({"object": "list", "data": data})

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._tracked(self._generate(request, "completion"))

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._tracked(self._generate(request, "chat"))

    async def _tracked(self, handler: Awaitable[web.StreamResponse]) -> web.StreamResponse:
        task = asyncio.current_task()  # aiohttp runs each request in a task of its own
        self._inflight.add(task)
        try:
            return await handler
        finally:
            self._inflight.discard(task)

    async def _generate(self, request: web.Request, kind: Kind) -> web.StreamResponse:
        with tracing.remote_parent(request.headers):  # a caller's traceparent: its trace goes on here
            return await self._answer(request, kind)

    async def _answer(self, request: web.Request, kind: Kind) -> web.StreamResponse:
        try:
            try:
                body = await request.json()
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise InvalidRequestError("body", f"the body is not valid JSON: {e}") from None
            req = parse_request(kind, body, self.default_max_tokens)
            check_model(self.router.pool, req.model)
            if self.draining:
                raise NotReadyError("the server is shutting down")
            attributes = self.router.genai_attributes(req.input)  # its model: the one named, or the one served
            shaper = ResponseShaper(kind, attributes[genai.REQUEST_MODEL], req.input.request_id, req.include_usage)
            events = self.measured.observe(self.router.generate(req.input), attributes)
            async with contextlib.aclosing(events):  # closing it cancels downstream calls
                # Errors up to the first token (validation, capacity, no worker)
                # get a real status code; only later ones arrive inside the stream.
                first = await anext(events)
                if req.stream:
                    return await self._stream(request, shaper, first, events)
                text, last = first.text, first
                async for last in events:
                    text += last.text
                return web.json_response(shaper.full(text, last.finish_reason.value, last.usage))
        except web.HTTPException:
            raise  # e.g. body too large: the middleware shapes it
        except Exception as e:  # CancelledError (client gone) is a BaseException: not caught
            return error_response(e, kind)

    async def _stream(self, request: web.Request, shaper: ResponseShaper, first: Event,
                      events: AsyncIterator[Event]) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        try:
            async with contextlib.aclosing(_sse_chunks(shaper, first, events)) as chunks:
                async for obj in chunks:
                    data = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"))
                    await resp.write(f"data: {data}\n\n".encode())
            await resp.write_eof()
        except ConnectionError:
            pass  # the client is gone; the caller's aclosing() cancels downstream
        return resp


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
        yield json.loads(error_response(e).text)
    yield "[DONE]"
