"""Requests come and go; blocks always return to the pool; bad input changes nothing."""

from __future__ import annotations

import random

import pytest

from pdserve.common import model_loader
from pdserve.common.engine.config import EngineConfig
from pdserve.common.engine.engine import LLMEngine
from pdserve.common.engine.sampling_params import SamplingParams
from pdserve.common.errors import CapacityExhaustedError, InvalidRequestError, NotFoundError


@pytest.fixture
def tiny_engine(tiny_model_dir):
    def make(**kw):
        return LLMEngine(EngineConfig(model=str(tiny_model_dir), **kw))

    return make


def test_1000_requests_with_aborts_return_every_block(tiny_engine):
    # A small pool forces preemption; a small budget forces chunking.
    engine = tiny_engine(num_kv_blocks=96, max_num_batched_tokens=96, max_num_seqs=16)
    rng = random.Random(7)
    shared = [rng.randrange(100, 5000) for _ in range(48)]  # some prompts share a prefix
    live: set[str] = set()
    aborted = finished = 0
    for i in range(1000):
        n = rng.randrange(1, 200)
        prompt = (shared[: rng.randrange(0, 48)] + [rng.randrange(100, 5000) for _ in range(n)])[:n]
        live.add(engine.add_request(prompt, SamplingParams(max_tokens=rng.randrange(1, 24), ignore_eos=True)))
        for out in engine.step():
            if out.finished:
                live.discard(out.request_id)
                finished += 1
        if live and rng.random() < 0.15:
            victim = rng.choice(sorted(live))
            engine.abort(victim)
            live.discard(victim)
            aborted += 1
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                live.discard(out.request_id)
                finished += 1
    stats = engine.stats()
    assert not live and finished + aborted == 1000 and aborted > 50
    assert stats.free_blocks == stats.total_blocks == 96
    assert stats.running == stats.waiting == 0
    assert stats.preemptions > 0 and stats.prefix_hits > 0


def test_a_sequence_that_would_outgrow_the_whole_pool_ends_with_length_instead_of_waiting_forever(tiny_engine):
    # Preempted past the pool's size, it could never be scheduled again: the
    # engine bounds its context by the pool instead.
    engine = tiny_engine(num_kv_blocks=3, block_size=4)
    assert engine.max_model_len == 12
    engine.add_request([101, 102, 103], SamplingParams(max_tokens=2**32 - 1, ignore_eos=True))
    outs = [o for _ in range(20) for o in engine.step()]
    assert outs[-1].finished and outs[-1].finish_reason.value == "length"
    assert 3 + outs[-1].num_output_tokens == 12 and not engine.has_unfinished()
    assert engine.stats().free_blocks == 3


def test_after_a_quarantine_a_sequence_ends_within_the_blocks_left_instead_of_waiting_forever(tiny_engine):
    engine = tiny_engine(num_kv_blocks=4, block_size=4)
    engine.reserve("q", [101], SamplingParams())
    engine.quarantine("q")  # one block gone for good: three are left, twelve tokens
    engine.add_request([101, 102, 103], SamplingParams(max_tokens=2**32 - 1, ignore_eos=True))
    outs = [o for _ in range(20) for o in engine.step()]
    assert outs[-1].finished and outs[-1].finish_reason.value == "length"
    assert 3 + outs[-1].num_output_tokens == 12 and not engine.has_unfinished()
    # A prompt the model takes, too long for what is left: this worker's capacity, not a bad request.
    with pytest.raises(CapacityExhaustedError):
        engine.add_request(list(range(100, 113)), SamplingParams())
    engine.reclaim("q")  # its transfer fenced after all: the whole pool bounds a context again
    assert engine.max_model_len == 16
    engine.add_request(list(range(100, 113)), SamplingParams())


def test_abort_frees_blocks_at_once(tiny_engine):
    engine = tiny_engine(num_kv_blocks=64)
    rid = engine.add_request(list(range(100, 200)), SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    assert engine.stats().free_blocks < 64
    engine.abort(rid)
    assert engine.stats().free_blocks == 64 and not engine.has_unfinished()
    with pytest.raises(NotFoundError):
        engine.abort(rid)


@pytest.mark.parametrize(
    "prompt, params, field",
    [
        ([], {}, "prompt"),
        ("", {}, "prompt"),
        (list(range(100, 2200)), {}, "prompt"),  # 2,100 tokens: past the 2,048-token context
        ([1, 2, 10**9], {}, "prompt"),
        ([1, 2, 3], {"max_tokens": 0}, "max_tokens"),
        ([1, 2, 3], {"temperature": -1.0}, "temperature"),
        ([1, 2, 3], {"top_p": 0.0}, "top_p"),
        ([1, 2, 3], {"top_p": 1.01}, "top_p"),
        ([1, 2, 3], {"top_k": -2}, "top_k"),  # -1: off, as vLLM
    ],
)
def test_bad_input_is_rejected_by_field_and_changes_nothing(tiny_engine, prompt, params, field):
    engine = tiny_engine(num_kv_blocks=256)
    before = engine.stats()
    with pytest.raises(InvalidRequestError) as err:
        engine.add_request(prompt, SamplingParams(**params) if params else None)
    assert err.value.field == field
    assert engine.stats() == before and not engine.has_unfinished()


def test_duplicate_request_id_is_rejected(tiny_engine):
    engine = tiny_engine(num_kv_blocks=64)
    engine.add_request([5, 6, 7], request_id="x")
    with pytest.raises(InvalidRequestError) as err:
        engine.add_request([5, 6, 7], request_id="x")
    assert err.value.field == "request_id"


def test_generation_stops_at_the_context_window(tiny_engine):
    engine = tiny_engine(num_kv_blocks=256, max_model_len=40)
    [out] = engine.generate([list(range(100, 130))], SamplingParams(max_tokens=100, ignore_eos=True))
    assert len(out) == 10


def test_model_loader_rejects_unknown_paths():
    with pytest.raises(FileNotFoundError):
        model_loader.resolve("/nonexistent/model.gguf")


async def test_a_pinned_engine_steps_on_its_cores_and_leaves_the_caller_unpinned(tiny_engine):
    import os
    import threading

    from pdserve.common import affinity
    from pdserve.common.engine.async_engine import AsyncEngine

    core, before = affinity.available()[-1], os.sched_getaffinity(0)
    engine = AsyncEngine(tiny_engine(num_kv_blocks=32), cpus=[core])
    await engine.start()
    try:
        await engine.add([5, 6, 7], SamplingParams(max_tokens=3, ignore_eos=True), request_id="r")
        outputs = [o async for o in engine.stream("r")]
        assert outputs[-1].finished
        (step,) = [t for t in threading.enumerate() if t.name.startswith("engine-step")]
        assert os.sched_getaffinity(step.native_id) == {core}
        assert os.sched_getaffinity(0) == before
        assert engine.describe().endswith(f"steps on core {core}")
    finally:
        await engine.stop()


async def test_an_engine_built_by_the_async_engine_is_built_and_warmed_on_its_step_thread(tiny_engine):
    """torch's parallel work stays on one thread: OpenMP gives each thread that starts it a team."""
    import threading

    from pdserve.common.engine.async_engine import AsyncEngine

    threads = []

    def build():
        threads.append(threading.current_thread().name)
        return tiny_engine(num_kv_blocks=32)

    engine = AsyncEngine(build)
    step = engine.engine.step

    def recorded_step():
        threads.append(threading.current_thread().name)
        return step()

    engine.engine.step = recorded_step
    engine.warm_up(tokens=8, rounds=1)
    await engine.start()
    try:
        await engine.add([5, 6, 7], SamplingParams(max_tokens=2, ignore_eos=True), request_id="r")
        assert [o async for o in engine.stream("r")][-1].finished
    finally:
        await engine.stop()
    assert len(threads) > 3 and all(name.startswith("engine-step") for name in threads)
    assert engine.step_ms_ewma > 0


async def test_an_engine_whose_waiting_request_cannot_get_blocks_waits_instead_of_spinning(tiny_engine):
    # Blocks held elsewhere (a reservation waiting for its KV): nothing can run until it goes.
    import asyncio

    from pdserve.common.engine.async_engine import AsyncEngine

    engine = AsyncEngine(tiny_engine(num_kv_blocks=4, block_size=4))
    steps = []
    step = engine.engine.step
    engine.engine.step = lambda: steps.append(1) or step()
    await engine.call(engine.engine.reserve, "held", list(range(100, 112)), SamplingParams())
    await engine.start()
    try:
        await engine.add([5, 6, 7, 8, 9], SamplingParams(max_tokens=2, ignore_eos=True), request_id="r")
        await asyncio.sleep(0.5)
        assert len(steps) <= 20  # a step each wake-up (at most every 50 ms), not thousands
        assert engine.step_ms_ewma == 0  # an empty step is no measurement of a step
        assert await engine.release("held")  # the blocks come back: it runs at once
        assert [o async for o in engine.stream("r")][-1].finished
    finally:
        await engine.stop()


async def test_a_failing_step_watcher_does_not_stop_the_engine(tiny_engine):
    from pdserve.common.engine.async_engine import AsyncEngine

    engine = AsyncEngine(tiny_engine(num_kv_blocks=32))
    engine.watch("broken", lambda: 1 / 0)  # a push trigger with a bug
    await engine.start()
    try:
        await engine.add([5, 6, 7], SamplingParams(max_tokens=3, ignore_eos=True), request_id="r")
        assert [o async for o in engine.stream("r")][-1].finished  # the loop lived on
    finally:
        await engine.stop()


async def test_a_reader_cancelled_again_while_its_abort_waits_for_the_step_still_aborts_the_request(tiny_engine):
    """The abort on leaving waits for the engine between steps; a second cancel there (a server stopping
    with grace, a deadline beside a client's cancel) must not leave the request running with no reader."""
    import asyncio

    from pdserve.common.engine.async_engine import AsyncEngine

    engine = AsyncEngine(tiny_engine(num_kv_blocks=32))
    await engine.start()
    try:
        await engine.add([5, 6, 7], SamplingParams(max_tokens=100, ignore_eos=True), request_id="r")
        first = asyncio.Event()

        async def read():
            async for _ in engine.stream("r"):
                first.set()

        reader = asyncio.create_task(read())
        await first.wait()
        async with engine._lock:  # the engine is mid-step: the reader's abort has to wait
            reader.cancel()
            for _ in range(5):
                await asyncio.sleep(0)
            reader.cancel()
            for _ in range(5):
                await asyncio.sleep(0)
        with pytest.raises(asyncio.CancelledError):
            await reader
        assert not await engine.call(engine.engine.has_unfinished)
        assert engine.engine.stats().free_blocks == engine.engine.stats().total_blocks
    finally:
        await engine.stop()
