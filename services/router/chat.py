"""The chat roles both front ends (gRPC Generate, OpenAI HTTP) accept, spelled once.

Chat templates render any role string as given, so an unknown role would reach the model as
text it was never trained on; it is refused instead, naming the message.
"""

from __future__ import annotations

from pdserve.common.errors import InvalidRequestError

ROLES = ("system", "user", "assistant", "tool")
# OpenAI's newer name for "system"; chat templates know only the latter.
_ALIASES = {"developer": "system"}


def chat_role(role: str, field: str) -> str:
    """`role` in the chat template's words; InvalidRequestError naming `field` if unknown."""
    role = _ALIASES.get(role, role)
    if role not in ROLES:
        shown = role if len(role) <= 40 else role[:40] + "..."
        raise InvalidRequestError(field, f"unknown role {shown!r}; one of {', '.join(ROLES)} or developer")
    return role
