"""The SDK's OpenTelemetry GenAI client metrics: token usage and call duration.

Recorded through the OpenTelemetry API under the GenAI semantic conventions'
names, so an application's existing GenAI dashboards count pdserve calls too.
Nothing is kept unless the application configures a MeterProvider (globally,
or passed to the client as `meter_provider=`).
"""

from __future__ import annotations

from typing import Any

from opentelemetry import metrics as otel_metrics

from pdserve.common import genai

# The conventions' advisory bucket boundaries.
_TOKEN_BUCKETS = [1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864]
_DURATION_BUCKETS = [0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92]


class ClientMetrics:
    def __init__(self, meter_provider: Any = None, target: str = "") -> None:
        meter = (meter_provider or otel_metrics.get_meter_provider()).get_meter("pdserve.client")
        host, _, port = target.rpartition(":")
        self.server = {"server.address": host.strip("[]"), "server.port": int(port)} if port.isdigit() and host else {}
        self.tokens = meter.create_histogram(
            "gen_ai.client.token.usage",
            unit="{token}",
            description="Tokens per call, by gen_ai.token.type (input: the prompt; output: the completion)",
            explicit_bucket_boundaries_advisory=_TOKEN_BUCKETS,
        )
        self.duration = meter.create_histogram(
            "gen_ai.client.operation.duration",
            unit="s",
            description="A Generate call, from its start to its last message or its error",
            explicit_bucket_boundaries_advisory=_DURATION_BUCKETS,
        )

    def attributes(self, chat: bool, model: str) -> dict[str, str | int]:
        attributes = {genai.OPERATION: genai.operation_name(chat)}
        if model:
            attributes[genai.REQUEST_MODEL] = model
        return {**attributes, **self.server}

    def finished(self, attributes: dict[str, str | int], seconds: float, input_tokens: int, output_tokens: int) -> None:
        self.duration.record(seconds, attributes)
        self.tokens.record(input_tokens, {**attributes, "gen_ai.token.type": "input"})
        self.tokens.record(output_tokens, {**attributes, "gen_ai.token.type": "output"})

    def failed(self, attributes: dict[str, str | int], seconds: float, error_type: str) -> None:
        self.duration.record(seconds, {**attributes, "error.type": error_type})
