"""A discrete-event simulation of a suite: the router's choices (by `router/policy.py`'s
formulas) and each worker's scheduler steps, timed by a profile. What it models and
what not: docs/planning.md ("The simulator").
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import deque
from dataclasses import dataclass, field

from pdserve.bench.workload import Request
from pdserve.planner.profile import Profile, StepModel, StepShape
from pdserve.router.policy import prefer_local


@dataclass(frozen=True)
class Topology:
    """What runs: colocated workers, or prefill and decode workers, with threads each and a chunk size."""

    mode: str  # "colocated" | "disaggregated"
    prefill: int
    decode: int
    threads: int  # per worker
    chunk: int = 512
    max_seqs: int = 64
    local_prefill: str = "auto"  # the router's --local-prefill: auto (the cost model) or never

    def __str__(self) -> str:
        shape = f"{self.decode} colocated" if self.mode == "colocated" else f"{self.prefill}P+{self.decode}D"
        never = ", every prompt remote" if self.local_prefill == "never" and self.prefill else ""
        return f"{shape}, {self.threads} thread{'s' * (self.threads > 1)} each, chunk {self.chunk}{never}"


@dataclass
class _Seq:
    req: Request
    computed: int = 0  # prompt tokens computed
    generated: int = 0  # tokens sampled
    token_times: list[float] = field(default_factory=list)
    decode: _Worker | None = None  # where it decodes

    @property
    def prompt(self) -> int:
        return len(self.req.prompt)

    @property
    def prefilling(self) -> bool:
        return self.computed < self.prompt


class _Worker:
    """One engine: its waiting and running sequences, and a step in progress."""

    def __init__(self, name: str, role: str, model: StepModel, topology: Topology):
        self.name = name
        self.role = role
        self.model = model
        self.topology = topology
        self.waiting: deque[_Seq] = deque()
        self.running: list[_Seq] = []
        self.incoming = 0  # sequences routed here still prefilling elsewhere (the router counts them in flight)
        self.busy = False
        self.last_step_ms = model.ms(StepShape(decode_seqs=1, decode_context=256))

    def queued_tokens(self) -> int:
        return sum(s.prompt - s.computed for s in (*self.waiting, *self.running) if s.prefilling)

    def prefill_tps(self) -> float:
        chunk = self.topology.chunk
        return 1000.0 * chunk / self.model.ms(StepShape.chunk(chunk, 0))

    def plan_step(self) -> tuple[StepShape, list[tuple[_Seq, int]], list[_Seq]]:
        """The scheduler's next batch: (shape, prefill chunks, decoding sequences)."""
        decodes = [s for s in self.running if not s.prefilling][: self.topology.max_seqs]
        shape = StepShape(decode_seqs=len(decodes), decode_context=sum(s.prompt + s.generated for s in decodes))
        budget, chunks = self.topology.chunk - len(decodes), []
        for s in [s for s in self.running if s.prefilling]:
            if budget <= 0:
                break
            n = min(budget, s.prompt - s.computed)
            chunks.append((s, n))
            budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.topology.max_seqs:
            s = self.waiting.popleft()
            self.running.append(s)
            n = min(budget, s.prompt - s.computed)
            chunks.append((s, n))
            budget -= n
        for s, n in chunks:
            shape = shape + StepShape.chunk(n, s.computed)
        return shape, chunks, decodes


@dataclass(frozen=True)
class Outcome:
    """One simulated request: its arrival, first token and last token (seconds), and tokens."""

    arrival_s: float
    first_s: float
    last_s: float
    output_tokens: int
    prompt_tokens: int
    path: str  # "colocated", "local" (prefilled on its decode worker) or "remote"

    @property
    def ttft_ms(self) -> float:
        return (self.first_s - self.arrival_s) * 1e3

    @property
    def tpot_ms(self) -> float | None:
        return (self.last_s - self.first_s) * 1e3 / (self.output_tokens - 1) if self.output_tokens > 1 else None


def simulate(topology: Topology, profile: Profile, requests: list[Request]) -> list[Outcome]:
    """Every request's outcome under `topology`, in arrival order."""
    model = profile.step_model(topology.threads)
    if topology.mode == "colocated":
        decoders = [_Worker(f"colocated-{i}", "colocated", model, topology) for i in range(topology.decode)]
        prefillers: list[_Worker] = []
    else:
        decoders = [_Worker(f"decode-{i}", "decode", model, topology) for i in range(topology.decode)]
        prefillers = [_Worker(f"prefill-{i}", "prefill", model, topology) for i in range(topology.prefill)]
    events: list = []
    order = itertools.count()
    push = lambda t, kind, *data: heapq.heappush(events, (t, next(order), kind, data))  # noqa: E731
    for r in requests:
        push(r.arrival_s, "arrive", r)
    paths: dict[int, str] = {}
    done: dict[int, _Seq] = {}
    hop_s = profile.router_hop_ms / 1e3

    def kick(w: _Worker, now: float) -> None:
        if w.busy or not (w.waiting or w.running):
            return
        shape, chunks, decodes = w.plan_step()
        ms = w.model.ms(shape)
        w.busy, w.last_step_ms = True, ms
        push(now + ms / 1e3, "step", w, chunks, decodes)

    def route(r: Request, now: float) -> None:
        seq = _Seq(r)
        decode = min(decoders, key=lambda w: (len(w.running) + len(w.waiting) + w.incoming, w.queued_tokens()))
        local = True
        if prefillers:
            prefill = min(prefillers, key=lambda w: w.queued_tokens())
            remote_ms = (
                prefill.last_step_ms
                + 1e3 * (prefill.queued_tokens() + seq.prompt) / prefill.prefill_tps()
                + profile.router_hop_ms
            )
            prefill_ms = 1e3 * seq.prompt / decode.prefill_tps()
            local_ms = (
                decode.last_step_ms
                + 1e3 * decode.queued_tokens() / decode.prefill_tps()
                + prefill_ms
                + len(decode.running) * prefill_ms
            )
            local = topology.local_prefill == "auto" and prefer_local(local_ms, remote_ms)
        paths[r.index] = "colocated" if not prefillers else ("local" if local else "remote")
        target = decode if local else prefill
        target.waiting.append(seq)
        seq.decode = decode
        decode.incoming += not local
        kick(target, now + hop_s)  # the router's whole cost to a request, paid on the way in

    while events:
        now, _, kind, data = heapq.heappop(events)
        if kind == "arrive":
            route(data[0], now)
        elif kind == "step":
            w, chunks, decodes = data
            w.busy = False
            for s in decodes:
                s.generated += 1
                s.token_times.append(now)
            for s, n in chunks:
                s.computed += n
                if not s.prefilling:  # caught up: sampled its first token
                    s.generated += 1
                    s.token_times.append(now)
            leaving = [
                s for s in w.running if s.generated >= s.req.max_tokens or (w.role == "prefill" and not s.prefilling)
            ]
            for s in leaving:
                w.running.remove(s)
                if s.generated >= s.req.max_tokens:
                    done[s.req.index] = s
                else:  # a prefill worker's finished prompt: its KV moves to the decode worker
                    blocks = math.ceil(s.prompt / profile.block_size)
                    move_s = (profile.transfer_base_ms + blocks * profile.transfer_ms_per_block) / 1e3
                    push(now + move_s, "arrive_kv", s)
            kick(w, now)
        elif kind == "arrive_kv":
            s = data[0]
            s.decode.incoming -= 1
            s.decode.running.append(s)
            kick(s.decode, now)
    return [
        Outcome(
            r.arrival_s,
            done[r.index].token_times[0],
            done[r.index].token_times[-1],
            done[r.index].generated,
            len(r.prompt),
            paths[r.index],
        )
        for r in requests
    ]
