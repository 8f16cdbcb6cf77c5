"""The OpenTelemetry GenAI semantic conventions' names that pdserve records, spelled once:
the router's server metrics and spans and the SDK's client metrics all use them, so
dashboards built for the conventions understand both."""

from __future__ import annotations

OPERATION = "gen_ai.operation.name"
REQUEST_MODEL = "gen_ai.request.model"


def operation_name(chat: bool) -> str:
    """The conventions' operation: a chat conversation, or a plain text completion."""
    return "chat" if chat else "text_completion"
