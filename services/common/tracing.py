"""OpenTelemetry tracing for every pdserve service: one trace per request.

`setup(service)` (once per process) builds the tracer provider from the standard OTEL_* variables; without
one, tracing is off and spans are no-ops. `Spans(scope, service)` starts a module's own spans.
Why these defaults: docs/observability.md ("Traces": "Spans", "Configuration").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, ParentBased, Sampler, TraceIdRatioBased
from opentelemetry.trace import Status, StatusCode

log = logging.getLogger(__name__)

DEFAULT_SAMPLE_RATIO = 1.0  # of requests arriving without a sampling decision (see the module doc)
DEFAULT_OTLP_PROTOCOL = "http/protobuf"  # the OTLP specification's default

Span = trace.Span
Context = otel_context.Context

_provider: TracerProvider | None = None
_tracers: dict[str, trace.Tracer] = {}


# ---- configuration ---------------------------------------------------------------
def _env(name: str, env: Mapping[str, str]) -> str:
    return env.get(name, "").strip()


def sampler_from_env(env: Mapping[str, str] = os.environ) -> Sampler:
    """OTEL_TRACES_SAMPLER / OTEL_TRACES_SAMPLER_ARG; unset: parentbased_traceidratio
    at DEFAULT_SAMPLE_RATIO (the ratio alone may be set with the _ARG)."""
    name = _env("OTEL_TRACES_SAMPLER", env).lower() or "parentbased_traceidratio"
    arg = _env("OTEL_TRACES_SAMPLER_ARG", env)
    try:
        ratio = float(arg) if arg else DEFAULT_SAMPLE_RATIO
    except ValueError:
        raise ValueError(f"OTEL_TRACES_SAMPLER_ARG: {arg!r} is not a number") from None
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"OTEL_TRACES_SAMPLER_ARG: {ratio} is not a ratio in [0, 1]")
    samplers: dict[str, Callable[[], Sampler]] = {
        "always_on": lambda: ALWAYS_ON,
        "always_off": lambda: ALWAYS_OFF,
        "traceidratio": lambda: TraceIdRatioBased(ratio),
        "parentbased_always_on": lambda: ParentBased(ALWAYS_ON),
        "parentbased_always_off": lambda: ParentBased(ALWAYS_OFF),
        "parentbased_traceidratio": lambda: ParentBased(TraceIdRatioBased(ratio)),
    }
    if name not in samplers:
        raise ValueError(f"OTEL_TRACES_SAMPLER: {name!r} is not one of {sorted(samplers)}")
    return samplers[name]()


def exporters_from_env(env: Mapping[str, str] = os.environ) -> list[SpanExporter]:
    """OTEL_TRACES_EXPORTER (otlp, console, none; comma-separated). Unset: otlp
    when OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT is set, else none, so a service
    started without a collector does not retry localhost:4317 forever."""
    names = _env("OTEL_TRACES_EXPORTER", env)
    if not names:
        endpoint = _env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", env) or _env("OTEL_EXPORTER_OTLP_ENDPOINT", env)
        names = "otlp" if endpoint else "none"
    exporters: list[SpanExporter] = []
    for name in (n.strip().lower() for n in names.split(",") if n.strip()):
        if name == "otlp":
            exporters.append(_otlp_exporter(env))
        elif name == "console":
            exporters.append(ConsoleSpanExporter())
        elif name != "none":
            raise ValueError(f"OTEL_TRACES_EXPORTER: {name!r} is not otlp, console or none")
    return exporters


def _otlp_exporter(env: Mapping[str, str]) -> SpanExporter:
    # The exporters read their endpoint, headers, certificates and timeout from OTEL_EXPORTER_OTLP_*.
    protocol = (
        _env("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", env)
        or _env("OTEL_EXPORTER_OTLP_PROTOCOL", env)
        or DEFAULT_OTLP_PROTOCOL
    )
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    elif protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    else:
        raise ValueError(f"OTEL_EXPORTER_OTLP_PROTOCOL: {protocol!r} is not grpc or http/protobuf")
    return OTLPSpanExporter()


def resource_for(service: str) -> Resource:
    """OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME, with service.name
    pdserve-<service> unless they name one."""
    resource = Resource.create({"service.namespace": "pdserve"})
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": f"pdserve-{service}"}))
    return resource


def setup(service: str) -> TracerProvider | None:
    """Install this process's tracer provider from the environment; None
    (tracing off) with OTEL_SDK_DISABLED=true, or when no exporter is configured:
    spans that go nowhere cost a third of the router's CPU per request
    (`pdserve bench control-plane`: 1.79 ms with them, 1.30 ms without). Spans
    still queued at exit are flushed."""
    if _env("OTEL_SDK_DISABLED", os.environ).lower() == "true":
        return None
    exporters = exporters_from_env()
    if not exporters:
        log.info("tracing: off (no exporter: set OTEL_EXPORTER_OTLP_ENDPOINT or OTEL_TRACES_EXPORTER)")
        return None
    provider = TracerProvider(resource=resource_for(service), sampler=sampler_from_env())
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    install(provider)
    trace.set_tracer_provider(provider)  # for any other instrumentation in the process
    log.info(
        "tracing: %s, sampler %s, exporters %s",
        provider.resource.attributes.get("service.name"),
        provider.sampler.get_description(),
        [type(e).__module__ for e in exporters],
    )
    return provider


def install(provider: TracerProvider | None) -> None:
    """Make `provider` the one pdserve's spans go to (None: tracing off).
    Tests and benchmarks switch providers at run time; setup() calls this once."""
    global _provider
    _provider = provider
    _tracers.clear()


@contextlib.contextmanager
def installed(provider: TracerProvider | None) -> Iterator[TracerProvider | None]:
    previous = _provider
    install(provider)
    try:
        yield provider
    finally:
        install(previous)


def enabled() -> bool:
    return _provider is not None


def tracer(scope: str) -> trace.Tracer:
    t = _tracers.get(scope)
    if t is None:
        t = _tracers[scope] = (_provider or trace.NoOpTracerProvider()).get_tracer(scope)
    return t


# ---- spans -------------------------------------------------------------------------
class Spans:
    """Spans of one part of pdserve. Attribute keywords become `pdserve.<name>`
    (None values are left out); `service` tags every span `pdserve.service`."""

    def __init__(self, scope: str, service: str | None = None):
        self.scope = f"pdserve.{scope}"
        self.base = {"pdserve.service": service} if service else {}

    def span(
        self,
        name: str,
        *,
        context: otel_context.Context | None = None,
        start_time: int | None = None,
        **attributes: Any,
    ) -> contextlib.AbstractContextManager[trace.Span]:
        """Current for a `with` block (never across a yield), ended at its end; an
        exception marks it failed. `context`: the parent's, where the current
        one is not the request's (callbacks of the engine loop)."""
        if _provider is None:
            return contextlib.nullcontext(trace.INVALID_SPAN)
        return tracer(self.scope).start_as_current_span(
            name, context=context, start_time=start_time, attributes=self._attributes(attributes)
        )

    def start(
        self,
        name: str,
        *,
        context: otel_context.Context | None = None,
        start_time: int | None = None,
        **attributes: Any,
    ) -> trace.Span:
        """A span the caller ends (e.g. one that lasts across a stream's yields)."""
        if _provider is None:
            return trace.INVALID_SPAN
        return tracer(self.scope).start_span(
            name, context=context, start_time=start_time, attributes=self._attributes(attributes)
        )

    def _attributes(self, attributes: Mapping[str, Any]) -> dict[str, Any]:
        return {**self.base, **_named(attributes)}


def _named(attributes: Mapping[str, Any]) -> dict[str, Any]:
    """`pdserve.<name>`, except OpenTelemetry GenAI convention names (`gen_ai.*`), which are kept."""
    return {k if k.startswith("gen_ai.") else f"pdserve.{k}": v for k, v in attributes.items() if v is not None}


def annotate(span: trace.Span | None = None, **attributes: Any) -> None:
    """Set `pdserve.<name>` (or `gen_ai.*`) attributes on `span` (default: the current one)."""
    span = span or trace.get_current_span()
    if span.is_recording():
        span.set_attributes(_named(attributes))


def current_context() -> otel_context.Context:
    return otel_context.get_current()


def current_span() -> trace.Span:
    return trace.get_current_span()


@contextlib.contextmanager
def remote_parent(headers: Mapping[str, str]) -> Iterator[None]:
    """Within: the caller's W3C trace context (`traceparent`, `tracestate` headers) is
    current, so spans started here continue the caller's trace (the HTTP API's
    counterpart of ServerInterceptor's metadata)."""
    token = otel_context.attach(propagate.extract(headers))
    try:
        yield
    finally:
        otel_context.detach(token)


def context_with(span: trace.Span, parent: otel_context.Context | None = None) -> otel_context.Context:
    return trace.set_span_in_context(span, parent)


def create_task(coro: Awaitable[Any], context: otel_context.Context) -> asyncio.Task:
    """A task whose spans have `context` for parent, for code whose own context
    is not the request's (callbacks of the engine loop)."""
    token = otel_context.attach(context)
    try:
        return asyncio.ensure_future(coro)  # the task copies the context current now
    finally:
        otel_context.detach(token)


def fail(span: trace.Span, exc: BaseException) -> None:
    """Mark a span failed by `exc`; a cancellation (client gone, stop string) is no failure."""
    if not span.is_recording():
        return
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
        span.set_attribute("pdserve.cancelled", True)
        return
    span.record_exception(exc)
    span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))


def within(ctx: otel_context.Context, stream: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """Iterate `stream` with `ctx` current inside each step and its close, but
    not between steps: a context attached across a yield leaks into the consumer
    and cannot be detached if the generator is finalized in another task.
    With tracing off, `stream` itself: a layer per step costs on every token."""
    return stream if _provider is None else _within(ctx, stream)


async def _within(ctx: otel_context.Context, stream: AsyncIterator[Any]) -> AsyncIterator[Any]:
    try:
        while True:
            token = otel_context.attach(ctx)
            try:
                item = await stream.__anext__()
            except StopAsyncIteration:
                return
            finally:
                otel_context.detach(token)
            yield item
    finally:
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            token = otel_context.attach(ctx)
            try:
                await aclose()
            finally:
                otel_context.detach(token)


def timing_attributes(timing: Mapping[str, float]) -> dict[str, float]:
    """A request's timing breakdown (queued_ms, prefill_ms, ...) as pdserve.timing.* attributes."""
    return {f"pdserve.timing.{k}": float(v) for k, v in timing.items()}
