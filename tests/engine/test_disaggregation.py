"""KV computed by one engine, exported as bytes, imported by another, decodes identically."""

from __future__ import annotations

import dataclasses

import pytest

from pdserve.common.engine.sampling_params import SamplingParams
from pdserve.common.errors import InvalidRequestError
from tests.engine.prompts import prompts_by_length
from tests.reference import transformers_greedy


def _handoff(prefill, decode, rid, ids, params):
    """The disaggregated flow at engine level: prefill -> KV bytes -> decode."""
    seq = decode.reserve(rid, ids, params)
    skip = seq.num_cached_tokens // decode.config.block_size  # decode already has these blocks
    first_only = dataclasses.replace(params, max_tokens=1)  # as the prefill worker asks, seed and all
    prefill.add_request(ids, first_only, request_id=rid, hold_blocks=True)
    [first] = [o for o in _run(prefill) if o.request_id == rid]
    decode.import_kv(rid, prefill.export_kv(rid)[skip:], first_block=skip)
    assert prefill.release(rid)
    decode.admit(rid, first.new_token_ids[0])
    return first.new_token_ids + [t for o in _run(decode) if o.request_id == rid for t in o.new_token_ids]


def _run(engine):
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    return outs


def test_prefill_here_decode_there_matches_transformers(make_engine, smollm2):
    _, model, tokenizer = smollm2
    prefill, decode = make_engine(max_num_batched_tokens=64), make_engine()
    params = SamplingParams(max_tokens=16)
    for i, ids in enumerate(prompts_by_length(tokenizer)[2:7]):
        expected = transformers_greedy(model, ids, 16)
        assert _handoff(prefill, decode, f"r{i}", ids, params) == expected
    for engine in (prefill, decode):
        s = engine.stats()
        assert s.free_blocks == s.total_blocks and s.held == s.reserved == 0


def test_seeded_sampling_in_bfloat16_draws_the_same_tokens_disaggregated_as_colocated(make_engine, smollm2):
    _, _, tokenizer = smollm2
    prefill, decode, colocated = (make_engine("bfloat16") for _ in range(3))
    params = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.95, seed=4242, ignore_eos=True)
    for i, ids in enumerate(prompts_by_length(tokenizer)[2:5]):
        [alone] = colocated.generate([ids], params)
        assert _handoff(prefill, decode, f"s{i}", ids, params) == alone, f"prompt of {len(ids)} tokens"


def test_reservation_reuses_decode_side_prefix_cache(make_engine, smollm2):
    _, _, tokenizer = smollm2
    ids = prompts_by_length(tokenizer)[5]  # 600 tokens
    prefill, decode = make_engine(), make_engine()
    params = SamplingParams(max_tokens=8)
    first_run = _handoff(prefill, decode, "a", ids, params)
    seq = decode.reserve("b", ids, params)
    assert seq.num_cached_tokens == (len(ids) - 1) // 16 * 16
    decode.release("b")
    assert _handoff(prefill, decode, "c", ids, params) == first_run


def test_release_and_abort_free_reserved_and_held_blocks(make_engine):
    engine = make_engine()
    total = engine.stats().total_blocks
    engine.reserve("r", list(range(100, 200)), SamplingParams())
    assert engine.stats().reserved == 1 and engine.stats().free_blocks < total
    engine.abort("r")
    engine.add_request(list(range(100, 200)), SamplingParams(max_tokens=1), request_id="h", hold_blocks=True)
    _run(engine)
    assert engine.stats().held == 1 and engine.stats().free_blocks < total
    assert engine.release("h") and not engine.release("h")
    assert engine.stats().free_blocks == total


def test_a_quarantined_reservation_stops_counting_and_its_blocks_stay_out_of_use_until_reclaimed(make_engine):
    # Its transfer could not be fenced (a sender died mid-message): data might still land there.
    engine = make_engine()
    total = engine.stats().total_blocks
    seq = engine.reserve("q", list(range(100, 200)), SamplingParams())
    quarantined = list(seq.block_table)
    engine.quarantine("q")
    stats = engine.stats()
    assert stats.reserved == 0  # admission no longer counts it against the queue
    assert stats.quarantined_blocks == len(quarantined) and stats.free_blocks == total - len(quarantined)
    assert not engine.release("q")  # nothing to free: the blocks stay out of use
    with pytest.raises(InvalidRequestError, match="in use"):  # a second quarantine under it would be lost
        engine.reserve("q", list(range(100, 200)), SamplingParams())
    engine.add_request(list(range(300, 400)), SamplingParams(max_tokens=1), request_id="next", hold_blocks=True)
    _run(engine)
    assert not set(engine.kv_blocks("next")[1]) & set(quarantined)

    assert engine.reclaim("q") == len(quarantined)  # fenced after all: the blocks are free again
    assert engine.reclaim("q") == 0
    engine.release("next")
    assert engine.stats().free_blocks == total and engine.stats().quarantined_blocks == 0


def test_a_quarantine_keeps_only_the_blocks_a_transfer_could_write(make_engine):
    # Its prefix-cache hits are shared with other requests and never a transfer's target.
    engine = make_engine()
    total, prompt = engine.stats().total_blocks, list(range(100, 200))
    engine.generate([prompt], SamplingParams(max_tokens=1))  # the prompt's full blocks are cached now
    seq = engine.reserve("q", prompt + list(range(300, 340)), SamplingParams())
    cached = seq.num_cached_tokens // 16
    assert cached == 6
    written = len(seq.block_table) - cached
    engine.quarantine("q")
    stats = engine.stats()
    assert stats.quarantined_blocks == written and stats.free_blocks == total - written
    assert engine.reserve("again", prompt + [7], SamplingParams()).num_cached_tokens == 96  # still cached
