"""Tracing configured by the standard OTEL_* environment variables."""

from __future__ import annotations

import pytest
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter
from opentelemetry.sdk.trace.export import ConsoleSpanExporter
from opentelemetry.sdk.trace.sampling import Decision
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, set_span_in_context

from pdserve.common import grpc_tracing, tracing

TRACE_ID = 0x0AF7651916CD43DD8448EB211C80319C


def _decide(sampler, parent_sampled: bool | None) -> Decision:
    parent = None
    if parent_sampled is not None:
        flags = TraceFlags(TraceFlags.SAMPLED if parent_sampled else TraceFlags.DEFAULT)
        parent = set_span_in_context(NonRecordingSpan(SpanContext(TRACE_ID, 0xB7AD6B7169203331, True, flags)))
    return sampler.should_sample(parent, TRACE_ID, "request").decision


def test_default_sampling_follows_the_callers_decision_and_samples_every_new_request():
    sampler = tracing.sampler_from_env({})
    assert _decide(sampler, None) is Decision.RECORD_AND_SAMPLE
    assert _decide(sampler, True) is Decision.RECORD_AND_SAMPLE
    assert _decide(sampler, False) is Decision.DROP


def test_sampler_arg_alone_sets_the_ratio_of_the_default_sampler():
    sampler = tracing.sampler_from_env({"OTEL_TRACES_SAMPLER_ARG": "0.25"})
    assert "TraceIdRatioBased{0.25}" in sampler.get_description()
    assert _decide(sampler, True) is Decision.RECORD_AND_SAMPLE  # still the caller's decision first


def test_named_samplers_are_honoured():
    assert _decide(tracing.sampler_from_env({"OTEL_TRACES_SAMPLER": "always_off"}), True) is Decision.DROP
    assert _decide(tracing.sampler_from_env({"OTEL_TRACES_SAMPLER": "always_on"}), False) is Decision.RECORD_AND_SAMPLE
    ratio = tracing.sampler_from_env({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0"})
    assert _decide(ratio, None) is Decision.DROP


@pytest.mark.parametrize(
    "env",
    [{"OTEL_TRACES_SAMPLER": "sometimes"}, {"OTEL_TRACES_SAMPLER_ARG": "half"}, {"OTEL_TRACES_SAMPLER_ARG": "1.5"}],
)
def test_bad_sampler_settings_are_refused(env):
    with pytest.raises(ValueError, match="OTEL_TRACES_SAMPLER"):
        tracing.sampler_from_env(env)


def test_without_exporter_or_endpoint_nothing_is_exported():
    assert tracing.exporters_from_env({}) == []
    assert tracing.exporters_from_env({"OTEL_TRACES_EXPORTER": "none"}) == []


def test_an_otlp_endpoint_alone_turns_on_otlp_export_over_http_protobuf():
    (exporter,) = tracing.exporters_from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"})
    assert isinstance(exporter, HttpExporter)


def test_exporter_list_and_protocol_are_honoured():
    env = {"OTEL_TRACES_EXPORTER": "otlp,console", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}
    otlp, console = tracing.exporters_from_env(env)
    assert isinstance(otlp, GrpcExporter) and isinstance(console, ConsoleSpanExporter)
    env = {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
    }
    (otlp,) = tracing.exporters_from_env(env)
    assert isinstance(otlp, HttpExporter)  # the traces-specific variable wins


@pytest.mark.parametrize(
    "env",
    [{"OTEL_TRACES_EXPORTER": "zipkin"}, {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}],
)
def test_unsupported_exporters_are_refused(env):
    with pytest.raises(ValueError, match="OTEL_"):
        tracing.exporters_from_env(env)


def test_service_name_defaults_to_pdserve_service_unless_the_environment_names_one(monkeypatch):
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    assert tracing.resource_for("prefill").attributes["service.name"] == "pdserve-prefill"
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "service.name=llm-prefill,deployment.environment=prod")
    resource = tracing.resource_for("prefill")
    assert resource.attributes["service.name"] == "llm-prefill"
    assert resource.attributes["deployment.environment"] == "prod"
    monkeypatch.setenv("OTEL_SERVICE_NAME", "prefill-eu")
    assert tracing.resource_for("prefill").attributes["service.name"] == "prefill-eu"


def test_without_an_exporter_tracing_stays_off_and_costs_no_interceptors(monkeypatch):
    for name in (
        "OTEL_TRACES_EXPORTER",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_SDK_DISABLED",
    ):
        monkeypatch.delenv(name, raising=False)
    with tracing.installed(None):
        assert tracing.setup("router") is None
        assert not tracing.enabled()
        assert not tracing.Spans("router").start("request").is_recording()
        assert grpc_tracing.client_interceptors() == []  # pdserve's own channels: plain calls
        assert len(grpc_tracing.client_interceptors(always=True)) == 4  # the SDK: an application may trace


def test_sdk_disabled_leaves_tracing_off(monkeypatch):
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert tracing.setup("router") is None
    assert not tracing.enabled()
    assert not tracing.Spans("router").start("request").is_recording()
