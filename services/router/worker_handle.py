"""A worker as the router sees it: its channel and a stub per service, identity and load."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import grpc

from pdserve.common.kv.spec import UNSTATED_WIRE_VERSION
from pdserve.common.roles import TAKES
from pdserve.router.arrival_rate import ArrivalRate
from pdserve.v1 import common_pb2 as pb
from pdserve.v1 import decode_pb2_grpc, prefill_pb2_grpc, worker_pb2_grpc


@dataclass
class WorkerHandle:
    target: str
    role: str  # "prefill", "decode" or (an elastic worker) "both"
    channel: grpc.aio.Channel
    info: pb.WorkerInfo | None = None
    load: pb.WorkerLoad | None = None
    inflight: int = 0  # requests the router has sent and not yet seen finish
    inflight_tokens: int = 0  # their prompt tokens not yet prefilled (the poll lags behind)
    own_prompt_tokens: int = 0  # the same requests' whole prompts (what the worker's queue counts)
    own_at_poll: int = 0  # own prompt tokens the last poll's queue count may include
    _polling: int | None = None  # own prompt tokens in flight at any time since that poll was sent
    arrivals: ArrivalRate = field(default_factory=ArrivalRate)  # requests the router has sent it, per second
    healthy: bool = False
    rtt_ms: float = 0.0  # GetLoad round trip, moving average
    registered: bool = False  # joined through RegisterWorker (else a static target)
    last_seen: float = 0.0  # monotonic time of the last heartbeat or successful poll
    discovered_by: str = ""  # the dns:NAME:PORT target whose lookup found it
    twin: bool = False  # another route (target, name or registration) reaches the same worker first
    switching_to: str = ""  # the role the router is moving it to (roles.py); "": none

    def add_prompt(self, prompt_tokens: int, uncached: int) -> None:
        self.inflight_tokens += uncached
        self.own_prompt_tokens += prompt_tokens
        if self._polling is not None:
            self._polling += prompt_tokens

    def prompt_done(self, prompt_tokens: int, uncached: int) -> None:
        self.inflight_tokens -= uncached
        self.own_prompt_tokens -= prompt_tokens

    def poll_sent(self) -> None:
        self._polling = self.own_prompt_tokens

    def polled(self, load: pb.WorkerLoad) -> None:
        self.load, self.own_at_poll, self._polling = load, self._polling or 0, None

    @property
    def queued_tokens(self) -> int:
        """Prompt tokens ahead of a new one there: the router's own not yet computed, counted
        as they come and go, and other routers' as the last poll saw them. The poll's count
        of our own is stale on arrival (a prompt computed since still shows): left out."""
        others = max(0, (self.load.waiting_tokens if self.load else 0) - self.own_at_poll)
        return others + self.inflight_tokens

    # One channel, a stub per service: an elastic worker serves them all.
    @functools.cached_property
    def prefill_stub(self) -> prefill_pb2_grpc.PrefillStub:
        return prefill_pb2_grpc.PrefillStub(self.channel)

    @functools.cached_property
    def decode_stub(self) -> decode_pb2_grpc.DecodeStub:
        return decode_pb2_grpc.DecodeStub(self.channel)

    @functools.cached_property
    def control_stub(self) -> worker_pb2_grpc.WorkerControlStub:
        return worker_pb2_grpc.WorkerControlStub(self.channel)

    @property
    def load_stub(self):
        """The service its GetLoad is asked through: one it serves in its role."""
        return self.prefill_stub if self.role == "prefill" else self.decode_stub

    @property
    def elastic(self) -> bool:
        return bool(self.info and self.info.elastic)

    def has_left(self, work: str) -> bool:
        """An elastic worker moving (or moved) off `work` ("prefill" or "decode"): it refuses
        such calls as UNAVAILABLE while healthy, so the refusal says nothing of its health."""
        return self.elastic and (bool(self.switching_to) or work not in TAKES.get(self.role, frozenset()))

    @property
    def routable(self) -> bool:
        return self.healthy and not self.twin

    @property
    def worker_id(self) -> str:
        return self.info.worker_id if self.info else self.target

    @property
    def fingerprint(self) -> bytes:
        return self.info.kv_spec.fingerprint if self.info else b""

    @property
    def wire_version(self) -> int:
        """The KV wire format it speaks (0 before its first poll)."""
        return (self.info.kv_wire_version or UNSTATED_WIRE_VERSION) if self.info else 0
