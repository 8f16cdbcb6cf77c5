"""Records a finished request reports, shared by the router, its HTTP front end and the SDK."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens whose KV came from a cache or the store


@dataclass(frozen=True)
class Route:
    """Where the request's last attempt ran."""

    prefill_worker_id: str  # "": prefilled on its decode worker
    decode_worker_id: str
    disaggregated: bool
