"""The routing policy's prices and the local-or-remote prefill decision."""

from __future__ import annotations

from pdserve.router import policy
from pdserve.router.worker_handle import WorkerHandle
from pdserve.v1 import common_pb2 as pb


def _worker(name: str, role: str, tps: float, step_ms: float, running: int = 0, waiting: int = 0) -> WorkerHandle:
    load = pb.WorkerLoad(prefill_tokens_per_s=tps, decode_step_ms=step_ms, running_seqs=running, waiting_tokens=waiting)
    return WorkerHandle(name, role, channel=None, load=load, healthy=True)


def _decide(decode: WorkerHandle, prefill: WorkerHandle, prompt: int, hop_ms: float = 1.0) -> bool:
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


def test_a_stream_the_router_sent_since_the_last_poll_counts_as_running():
    decode = _worker("d", "decode", tps=2000, step_ms=20)  # idle at the last poll
    prefill = _worker("p", "prefill", tps=2000, step_ms=20)
    assert _decide(decode, prefill, prompt=1000)
    decode.inflight = 1  # but the router has sent it a request since
    assert not _decide(decode, prefill, prompt=1000)


def test_a_long_prompt_leaves_an_idle_decode_worker_that_streams_keep_arriving_at():
    # One CPU core: 1,000 tokens stall the worker for 5 s. At 0.2 requests/s one
    # more stream arrives in that time and waits for the rest of it.
    def decode_worker(arrivals: int) -> WorkerHandle:
        w = _worker("d", "decode", tps=200, step_ms=50)
        for _ in range(arrivals):  # 6 in the meter's 30 s window: 0.2/s
            w.arrivals.add()
        return w

    prefill = _worker("p", "prefill", tps=200, step_ms=50)
    assert _decide(decode_worker(0), prefill, prompt=1000)  # nobody to stall
    assert not _decide(decode_worker(6), prefill, prompt=1000)
    assert _decide(decode_worker(6), prefill, prompt=32)  # a short prompt still stays


def test_a_queue_on_the_prefill_worker_keeps_the_prompt_local():
    decode = _worker("d", "decode", tps=2000, step_ms=20, running=1)
    prefill = _worker("p", "prefill", tps=2000, step_ms=20, waiting=8000)
    assert _decide(decode, prefill, prompt=500)


def test_a_poll_that_still_counts_a_computed_prompt_does_not_make_its_worker_look_busy():
    # The last request's prompt was queued on b when b answered the poll, and is computed since.
    index = policy.PrefixIndex()
    a, b = _worker("a", "prefill", 2000, 20), _worker("b", "prefill", 2000, 20)
    hashes = [bytes([i]) for i in range(20)]
    index.record("b", hashes, {"a", "b"})
    b.add_prompt(332, 12)
    b.poll_sent()
    b.polled(pb.WorkerLoad(prefill_tokens_per_s=2000, decode_step_ms=20, waiting_tokens=332))
    b.prompt_done(332, 12)
    assert b.queued_tokens == 0
    choice = policy.cheapest([a, b], index, hashes + [b"q"], 332, 16)
    assert choice.worker is b


def test_another_routers_queue_on_a_worker_counts_until_the_next_poll():
    w = _worker("w", "prefill", 2000, 20)
    w.add_prompt(300, 300)
    w.poll_sent()
    w.add_prompt(100, 40)  # sent while the poll was out: the count may include it
    w.polled(pb.WorkerLoad(prefill_tokens_per_s=2000, waiting_tokens=8400))
    assert w.queued_tokens == 8000 + 340
    w.prompt_done(300, 300)
    w.prompt_done(100, 40)
    assert w.queued_tokens == 8000


def test_cheapest_prefers_the_worker_holding_the_prefix():
    index = policy.PrefixIndex()
    a, b = _worker("a", "prefill", 2000, 20), _worker("b", "prefill", 2000, 20)
    hashes = [bytes([i]) for i in range(20)]
    index.record("b", hashes, {"a", "b"})
    choice = policy.cheapest([a, b], index, hashes, 20 * 16, 16)
    assert choice.worker is b and choice.cached_blocks == 20


def test_the_prefix_estimates_of_workers_gone_from_the_pool_are_dropped():
    # Worker ids that come and go (a Deployment's pod names) must not pile up, each up to
    # 200,000 hashes; a worker back under its old id had lost its cache anyway.
    index = policy.PrefixIndex()
    hashes = [bytes([i]) for i in range(4)]
    index.record("old-pod", hashes, {"old-pod"})
    index.record("new-pod", hashes, {"new-pod"})  # old-pod deregistered meanwhile
    assert index.size("old-pod") == 0 and index.size("new-pod") == 4


def _fingerprinted(name: str, role: str, fingerprint: bytes) -> WorkerHandle:
    w = _worker(name, role, tps=1000.0, step_ms=1.0)
    w.info = pb.WorkerInfo(worker_id=name, kv_spec=pb.KVSpec(fingerprint=fingerprint, block_size=16))
    return w


def test_a_prompt_goes_only_to_a_prefill_worker_of_the_decode_workers_kv_layout():
    # A fleet in the middle of an upgrade: a prefill worker of another model or layout
    # could not fill the decode worker's blocks (it would refuse the ticket), so it is never paired.
    from pdserve.router.router import Router
    from pdserve.router.worker_pool import WorkerPool

    tokenizer = type("Tokenizer", (), {"__len__": lambda self: 5000, "get_vocab": lambda self: {"a": 0}})()
    pool = WorkerPool(
        decode=[_fingerprinted("decode-0", "decode", b"A" * 16)],
        prefill=[_fingerprinted("old", "prefill", b"B" * 16), _fingerprinted("new", "prefill", b"A" * 16)],
    )
    router = Router(tokenizer, pool, mode="disaggregated", max_model_len=4096, local_prefill="never")
    assert router.plan(list(range(100, 600))).prefill.worker.worker_id == "new"
    pool.prefill.pop()  # only the other layout is left: the decode worker prefills itself
    assert router.plan(list(range(100, 600))).prefill is None


def test_a_failed_worker_is_excluded_alone_even_where_another_shares_its_worker_id():
    # A copied config repeats a worker id: excluding by id left a request nowhere to go.
    from pdserve.common.engine.sampling_params import SamplingParams
    from pdserve.router.attempt import Progress
    from pdserve.router.recovery import WorkerFailedError
    from pdserve.router.router import Router
    from pdserve.router.worker_pool import WorkerPool

    tokenizer = type("Tokenizer", (), {"__len__": lambda self: 5000, "get_vocab": lambda self: {"a": 0}})()
    twins = [_fingerprinted("decode-0", "decode", b"A" * 16) for _ in range(2)]
    twins[1].target = "127.0.0.1:2"
    router = Router(tokenizer, WorkerPool(decode=twins), mode="colocated", max_model_len=4096)
    progress = Progress("r", list(range(100, 200)), SamplingParams(), None, 0.0)
    progress.failures.append(WorkerFailedError(twins[0], "generate", None, "gone"))
    assert router.plan(progress.context, progress.excluded).decode.worker is twins[1]
