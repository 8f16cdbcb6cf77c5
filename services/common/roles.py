"""Worker roles: what each takes, and the ones an elastic worker moves between."""

from __future__ import annotations

ELASTIC_ROLES = ("prefill", "decode", "both")
# The calls a worker of each role takes new work for (colocated: a decode worker that prefills its own).
TAKES = {
    "prefill": frozenset({"prefill"}),
    "decode": frozenset({"decode"}),
    "both": frozenset({"prefill", "decode"}),
    "colocated": frozenset({"decode"}),
}
