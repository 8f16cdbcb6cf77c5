"""Routing policy: which workers a request's prefill and decode run on, priced in
estimated milliseconds from the workers' reported speeds and loads and the router's
own measured hop. Why: docs/architecture.md ("Routing and conditional disaggregation").
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from pdserve.router.worker_handle import WorkerHandle

DEFAULT_PREFILL_TPS = 1000.0  # used only until a worker reports a measurement
LOCAL_MARGIN = 0.25  # how much cheaper a remote prefill must look to be taken (see prefer_local)


class PrefixIndex:
    """Which block hashes the router has sent to each worker (an LRU estimate of
    its prefix cache, as SGLang's and Dynamo's routers keep)."""

    def __init__(self, max_blocks_per_worker: int = 200_000):
        self.max_blocks = max_blocks_per_worker
        self._by_worker: dict[str, OrderedDict[bytes, None]] = {}

    def overlap(self, worker_id: str, hashes: list[bytes]) -> int:
        """Leading blocks of `hashes` the worker probably holds."""
        held = self._by_worker.get(worker_id)
        n = 0
        if held:
            for h in hashes:
                if h not in held:
                    break
                n += 1
        return n

    def size(self, worker_id: str) -> int:
        return len(self._by_worker.get(worker_id, ()))

    def record(self, worker_id: str, hashes: list[bytes], known: set[str]) -> None:
        """`hashes` sent to worker_id; the estimates of workers no longer `known` (gone, or back
        under a new id: its cache went with it) are dropped, so ids that come and go don't pile up."""
        for gone in self._by_worker.keys() - known - {worker_id}:
            del self._by_worker[gone]
        held = self._by_worker.setdefault(worker_id, OrderedDict())
        for h in hashes:
            held[h] = None
            held.move_to_end(h)
        while len(held) > self.max_blocks:
            held.popitem(last=False)


@dataclass(frozen=True)
class Choice:
    worker: WorkerHandle
    cost_ms: float
    cached_blocks: int


def prefill_tps(w: WorkerHandle) -> float:
    return (w.load.prefill_tokens_per_s if w.load and w.load.prefill_tokens_per_s else 0.0) or DEFAULT_PREFILL_TPS


def step_ms(w: WorkerHandle) -> float:
    """A forward pass's fixed cost on this worker (reading the weights once)."""
    return w.load.decode_step_ms if w.load else 0.0


def prefill_cost_ms(w: WorkerHandle, prompt_tokens: int, cached_tokens: int) -> float:
    """Time to this prompt's first token on `w`: its queue, then one pass over what it lacks."""
    return step_ms(w) + 1000.0 * (w.queued_tokens + max(0, prompt_tokens - cached_tokens)) / prefill_tps(w)


def cheapest(
    workers: list[WorkerHandle],
    index: PrefixIndex,
    hashes: list[bytes],
    prompt_tokens: int,
    block_size: int,
    tolerance: float = 1.0,
) -> Choice:
    """The cheapest worker; among those within `tolerance` of it (measured costs are
    noisy; a cached prefix is cheaper by far more), the one whose
    cache the router has filled least, so distinct prefixes spread out while a
    worker that holds this prefix (much cheaper) keeps it."""
    choices = []
    for w in workers:
        cached = index.overlap(w.worker_id, hashes)
        choices.append(Choice(w, prefill_cost_ms(w, prompt_tokens, cached * block_size), cached))
    best = min(c.cost_ms for c in choices)
    near = [c for c in choices if c.cost_ms <= best * (1 + tolerance)]
    return min(near, key=lambda c: (index.size(c.worker.worker_id), c.cost_ms))


def local_prefill_cost_ms(decode: Choice, uncached_tokens: int) -> float:
    """Time to first token on the decode worker, plus the stall its prefill adds
    to the next token of every stream that worker is running, and of every
    stream expected to arrive while it runs (each waits half of it on average).

    Running streams: the router's own count of requests on the worker when that
    is higher than the last poll's (a stream started since is stalled as well).
    """
    w = decode.worker
    prefill_ms = 1000.0 * uncached_tokens / prefill_tps(w)
    running = max(w.load.running_seqs if w.load else 0, w.inflight)
    arriving = w.arrivals.per_s() * prefill_ms / 1000.0
    return decode.cost_ms + (running + arriving / 2) * prefill_ms


def remote_prefill_cost_ms(prefill: Choice, hop_ms: float) -> float:
    return prefill.cost_ms + hop_ms


def prefer_local(local_ms: float, remote_ms: float, margin: float = LOCAL_MARGIN) -> bool:
    """Prefill locally unless the remote path is cheaper by more than `margin`.
    Identical workers' measured speeds differ by noise (a few ms a pass on a
    busy host), and a hop also spends a second worker, a transfer and a failure
    surface, so a near tie goes local; a busy decode worker's stall term is a
    multiple of the prefill time and still sends long prompts away."""
    return local_ms <= remote_ms * (1.0 + margin)
