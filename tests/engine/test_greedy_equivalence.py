"""Greedy output of the engine is token-identical to transformers' generate()."""

from __future__ import annotations

import pytest

from pdserve.common.engine.sampling_params import SamplingParams
from tests.engine.prompts import prompts_by_length
from tests.reference import transformers_greedy

NEW_TOKENS = 24


@pytest.fixture(scope="module")
def cases(smollm2):
    """(prompt ids, reference continuation) for eight prompts of 1 to 1,500 tokens."""
    _, model, tokenizer = smollm2
    return [(ids, transformers_greedy(model, ids, NEW_TOKENS)) for ids in prompts_by_length(tokenizer)]


def _greedy():
    return SamplingParams(max_tokens=NEW_TOKENS)


def test_prompts_span_1_to_1500_tokens(cases):
    lengths = [len(ids) for ids, _ in cases]
    assert len(lengths) >= 8 and min(lengths) == 1 and max(lengths) == 1500


def test_each_prompt_alone_matches_transformers(make_engine, cases):
    engine = make_engine()
    for ids, expected in cases:
        [got] = engine.generate([ids], _greedy())
        assert got == expected, f"prompt of {len(ids)} tokens"


def test_batched_staggered_chunked_matches_transformers(make_engine, cases):
    """All prompts in one continuous batch, arriving a few steps apart, prefill chunk 64."""
    engine = make_engine(max_num_batched_tokens=64)
    got: dict[str, list[int]] = {}
    pending = list(enumerate(cases))
    steps = 0
    while pending or engine.has_unfinished():
        if pending and steps % 3 == 0:
            i, (ids, _) = pending.pop(0)
            got[engine.add_request(ids, _greedy(), request_id=str(i))] = []
        for out in engine.step():
            got[out.request_id].extend(out.new_token_ids)
        steps += 1
    for i, (ids, expected) in enumerate(cases):
        assert got[str(i)] == expected, f"prompt of {len(ids)} tokens"
    # Arrivals overlapped: more steps than the longest prompt alone would need.
    assert steps > 1500 // 64 + NEW_TOKENS
    assert engine.stats().free_blocks == engine.stats().total_blocks
