"""Process logging: one line per event, as text or JSON, with request and trace ids.

`setup(level, fmt, service)` configures the root logger once per process; `bind_request()` binds the
current task's request id. What a line holds, and what is never logged: docs/observability.md ("Logs").
"""

from __future__ import annotations

import contextvars
import datetime
import json
import logging
import sys
from typing import Any, Literal, TextIO

from opentelemetry import trace

LogFormat = Literal["text", "json"]
FORMATS: tuple[str, ...] = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_request_id: contextvars.ContextVar[str] = contextvars.ContextVar("pdserve_request_id", default="")
# What every LogRecord has; anything else on a record came from `extra=`.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "request_id",
    "trace_id",
    "span_id",
    "service",
    "taskName",
}


def bind_request(request_id: str) -> contextvars.Token[str]:
    """Tag this task's log records (and those of tasks it starts) with a request id."""
    return _request_id.set(request_id)


def unbind_request(token: contextvars.Token[str]) -> None:
    _request_id.reset(token)


def current_request_id() -> str:
    return _request_id.get()


class ContextFilter(logging.Filter):
    """Adds request_id, trace_id, span_id and service to every record."""

    def __init__(self, service: str = "") -> None:
        super().__init__()
        self.service = service

    def filter(self, record: logging.LogRecord) -> bool:
        record.service = self.service
        record.request_id = _request_id.get()
        ctx = trace.get_current_span().get_span_context()
        record.trace_id = format(ctx.trace_id, "032x") if ctx.is_valid else ""
        record.span_id = format(ctx.span_id, "016x") if ctx.is_valid else ""
        return True


def extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The fields a call passed as `extra={...}`, in its order."""
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in ("service", "request_id", "trace_id", "span_id"):
            value = getattr(record, key, "")
            if value:
                out[key] = value
        out.update(extra_fields(record))
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exception"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """The classic line, then `[key=value ...]`: the extra fields of pdserve's own
    calls (None and "" left out) and the ids, when there are any. Other libraries'
    extras stay out (aiohttp's access log repeats its whole line in them)."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        ours = record.name.startswith("pdserve.")
        fields = {k: v for k, v in extra_fields(record).items() if v not in (None, "")} if ours else {}
        fields.update((k, v) for k in ("request_id", "trace_id") if (v := getattr(record, k, "")))
        if not fields:
            return line
        tail = " ".join(f"{k}={v}" for k, v in fields.items())
        head, sep, rest = line.partition("\n")  # a traceback stays below the line
        return f"{head} [{tail}]{sep}{rest}"


def make_handler(fmt: LogFormat = "text", service: str = "", stream: TextIO | None = None) -> logging.Handler:
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {FORMATS}, not {fmt!r}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(ContextFilter(service))
    return handler


def setup(
    level: str | int = "WARNING", fmt: LogFormat = "text", service: str = "", stream: TextIO | None = None
) -> None:
    """Replace the root logger's handlers with one that writes `fmt` lines."""
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(make_handler(fmt, service, stream))
    root.setLevel(level.upper() if isinstance(level, str) else level)
