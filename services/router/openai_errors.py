"""OpenAI's error shape for every refusal of the HTTP front end, whoever makes it.

`{"error": {"message", "type", "param", "code"}}` comes from three places: our typed
exceptions (`error_response`), aiohttp's HTTP errors inside the app (the middleware), and
requests aiohttp refuses before any handler runs, such as a header over its size limit
(`JsonErrorRunner`). Bodies are read here too, so that no body is a 500 (docs/openai.md).
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any

from aiohttp import web

from pdserve.common.errors import (
    CapacityExhaustedError,
    InvalidRequestError,
    NotReadyError,
    TransferFailedError,
    UnauthenticatedError,
)
from pdserve.router.models import ModelNotFoundError

log = logging.getLogger(__name__)


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_payload(exc: BaseException, kind: str | None = None) -> tuple[int, dict[str, Any]]:
    """OpenAI's status and error body for an exception; internals never leak.
    `kind` ("chat" or "completion") names the prompt field in the API's words."""
    if isinstance(exc, ModelNotFoundError):  # OpenAI's status for it, not 400
        return 404, error_body(str(exc), "invalid_request_error", "model", "model_not_found")
    if isinstance(exc, InvalidRequestError):
        param, message = exc.field, str(exc)
        if param.startswith("prompt"):  # the router's names for the prompt: prompt, prompt.chat, ...
            param = "messages" if kind == "chat" else "prompt"
            message = f"{param}: {exc.reason}"  # in the API's own names
        param = None if param == "body" else param
        return 400, error_body(message, "invalid_request_error", param)
    if isinstance(exc, CapacityExhaustedError):
        return 429, error_body(str(exc), "requests", None, "rate_limit_exceeded")
    if isinstance(exc, UnauthenticatedError):
        return 401, error_body(str(exc), "invalid_request_error", None, "invalid_api_key")
    if isinstance(exc, (NotReadyError, TransferFailedError)):  # workers failed it: another call may not
        return 503, error_body(str(exc), "server_error", None, "service_unavailable")
    incident = uuid.uuid4().hex[:12]
    log.error("HTTP request failed (incident %s)", incident, exc_info=exc)
    return 500, error_body(f"internal error (incident {incident})", "server_error")


# 429 and 503 pass (a full router, a worker back within seconds): clients such as OpenAI's SDK wait
# this long before they try again, instead of their own backoff.
_STATUS_HEADERS = {401: {"WWW-Authenticate": "Bearer"}, 429: {"Retry-After": "1"}, 503: {"Retry-After": "1"}}


def error_response(exc: BaseException, kind: str | None = None, headers: dict[str, str] | None = None) -> web.Response:
    """`error_payload` as a response, with `headers`."""
    status, body = error_payload(exc, kind)
    headers = {**(headers or {}), **_STATUS_HEADERS.get(status, {})}
    return web.json_response(body, status=status, headers=headers)


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


async def read_body(request: web.Request) -> bytes:
    """The request's raw body; InvalidRequestError (field `body`) for one that cannot be read."""
    try:
        return await request.read()  # past client_max_size: HTTPRequestEntityTooLarge, for the middleware
    except web.RequestPayloadError as e:  # e.g. Content-Encoding: gzip on a body that is not gzip
        # The parser gave up mid-body: the body ends here (else aiohttp's lingering read raises this
        # again and logs it as unhandled), and so does the connection, after this answer.
        request.content.feed_eof()
        request.protocol.close()
        cause = getattr(e.__cause__, "message", None) or str(e).rsplit("message:", 1)[-1]
        raise InvalidRequestError("body", f"cannot be read: {cause.strip()}") from None


def decode_json(raw: bytes, charset: str | None) -> Any:
    """A body decoded; InvalidRequestError (field `body`) for whatever does not decode."""
    try:
        return json.loads(raw.decode(charset or "utf-8"))
    except LookupError:  # the Content-Type names a charset Python does not know, or no text encoding
        raise InvalidRequestError("body", f"unknown charset {charset!r}") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise InvalidRequestError("body", f"the body is not valid JSON: {e}") from None
    except RecursionError:  # json's C decoder recurses once per level: ~1000 levels
        raise InvalidRequestError("body", "the body's JSON is nested too deeply") from None


class _JsonErrorHandler(web.RequestHandler):
    """aiohttp answers a request it cannot parse (a header line over max_field_size, a bad
    request line, broken chunking) itself, in plain text, before any middleware runs:
    its handle_error() is the one place to say the same in OpenAI's shape."""

    __slots__ = ()

    def handle_error(
        self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None, message: str | None = None
    ) -> web.StreamResponse:
        if status >= 500:  # aiohttp logs it and leaks nothing; our shape on top
            super().handle_error(request, status, exc, message)
            body = error_body("internal error", "server_error")
        else:  # the client's bytes: no traceback in our log
            self.logger.debug("refused an unparsable request from %s: %s", request.remote, exc)
            if request.writer.output_size > 0:  # as aiohttp: a response is under way, nothing can follow
                raise ConnectionError("response already started")
            reason = str(getattr(exc, "message", None) or message or "unparsable")
            reason = " ".join(reason.split())  # aiohttp's spans lines, with a caret under the bad byte
            body = error_body(f"bad HTTP request: {reason[:200]}", "invalid_request_error")
        resp = web.json_response(body, status=status)
        resp.force_close()  # as aiohttp: the connection's state is unknown after a parse error
        return resp


class _JsonErrorServer(web.Server):
    def __call__(self) -> web.RequestHandler:
        # As web.Server.__call__, with our handler class (aiohttp has no option for it).
        return _JsonErrorHandler(self, loop=self._loop, **self._kwargs)


class JsonErrorRunner(web.AppRunner):
    """web.AppRunner whose connections answer unparsable requests in OpenAI's shape."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()  # as aiohttp makes it: app started, handler_args applied
        server.__class__ = _JsonErrorServer  # only __call__ differs: the handler each connection gets
        return server
