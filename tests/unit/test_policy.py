"""The routing policy's prices and the local-or-remote prefill decision."""
from __future__ import annotations

from pdserve.router import policy
from pdserve.router.worker_pool import Worker
from pdserve.v1 import common_pb2 as pb


def _worker(name: str, role: str, tps: float, step_ms: float, running: int = 0, waiting: int = 0) -> Worker:
    load = pb.WorkerLoad(prefill_tokens_per_s=tps, decode_step_ms=step_ms,
                         running_seqs=running, waiting_tokens=waiting)
    return Worker(name, role, channel=None, stub=None, load=load, healthy=True)


def _decide(decode: Worker, prefill: Worker, prompt: int, hop_ms: float = 1.0) -> bool:
    index = policy.PrefixIndex()
    d = policy.cheapest([decode], index, [], prompt, 16)
    p = policy.cheapest([prefill], index, [], prompt, 16)
    return policy.prefer_local(policy.local_prefill_cost_ms(d, prompt), policy.remote_prefill_cost_ms(p, hop_ms))


def test_an_idle_decode_worker_prefills_locally_even_if_measured_a_little_slower():
    # Same hardware, measurements 15% apart: noise, not a reason for a hop.
    decode = _worker("d", "decode", tps=1700, step_ms=23)
    prefill = _worker("p", "prefill", tps=2000, step_ms=20)
    assert _decide(decode, prefill, prompt=24)


def test_a_clearly_faster_prefill_worker_takes_the_prompt():
    decode = _worker("d", "decode", tps=1000, step_ms=20)
    prefill = _worker("p", "prefill", tps=8000, step_ms=5)
    assert not _decide(decode, prefill, prompt=2000)


def test_a_long_prompt_leaves_a_busy_decode_worker():
    # Four running streams would each wait for the whole local prefill.
    decode = _worker("d", "decode", tps=2000, step_ms=20, running=4)
    prefill = _worker("p", "prefill", tps=2000, step_ms=20)
    assert not _decide(decode, prefill, prompt=1000)
    assert _decide(_worker("d", "decode", tps=2000, step_ms=20), prefill, prompt=1000)


def test_a_queue_on_the_prefill_worker_keeps_the_prompt_local():
    decode = _worker("d", "decode", tps=2000, step_ms=20, running=1)
    prefill = _worker("p", "prefill", tps=2000, step_ms=20, waiting=8000)
    assert _decide(decode, prefill, prompt=500)


def test_cheapest_prefers_the_worker_holding_the_prefix():
    index = policy.PrefixIndex()
    a, b = _worker("a", "prefill", 2000, 20), _worker("b", "prefill", 2000, 20)
    hashes = [bytes([i]) for i in range(20)]
    index.record("b", hashes)
    choice = policy.cheapest([a, b], index, hashes, 20 * 16, 16)
    assert choice.worker is b and choice.cached_blocks == 20
