"""Chunked prefill: a long prompt goes a chunk per step between the running streams'
decode steps; without it, the whole prompt goes in one step, whatever the budget."""

from __future__ import annotations

import pytest

from pdserve.common.engine.config import EngineConfig
from pdserve.common.engine.engine import LLMEngine
from pdserve.common.engine.sampling_params import SamplingParams


@pytest.mark.parametrize("chunked, steps_to_first_token", [(True, 4), (False, 1)])
def test_a_long_prompt_beside_a_running_stream_is_chunked_only_when_chunking_is_on(
    tiny_model_dir, chunked, steps_to_first_token
):
    engine = LLMEngine(
        EngineConfig(model=str(tiny_model_dir), max_num_batched_tokens=32, enable_chunked_prefill=chunked)
    )
    engine.add_request([101] * 5, SamplingParams(max_tokens=50, ignore_eos=True), request_id="running")
    engine.step()  # its prompt: from now on it decodes a token every step
    engine.add_request(list(range(200, 300)), SamplingParams(max_tokens=2, ignore_eos=True), request_id="long")
    for steps in range(1, 40):  # bounded: a prompt that never fits must fail here, not hang
        outs = {o.request_id: o for o in engine.step()}
        assert outs["running"].new_token_ids  # the running stream never skips a step, chunked or not
        if "long" in outs and outs["long"].new_token_ids:
            break
    # Chunked: 31 prompt tokens a step (the budget less the running decode): 100 tokens in 4 steps.
    assert steps == steps_to_first_token
    while engine.has_unfinished():
        engine.step()
    assert engine.stats().free_blocks == engine.stats().total_blocks
