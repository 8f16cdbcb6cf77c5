"""A request sharing a long prefix computes only its new tokens, with the same output."""

from __future__ import annotations

from pdserve.common.engine.sampling_params import SamplingParams
from tests.engine.prompts import text_of_tokens


def test_shared_1000_token_prefix_is_not_recomputed(make_engine, smollm2):
    _, _, tokenizer = smollm2
    prefix = text_of_tokens(tokenizer, 1000)
    first = prefix + tokenizer.encode(" Question one: what is this about?", add_special_tokens=False)
    second = prefix + tokenizer.encode(" Question two: name one topic.", add_special_tokens=False)
    params = SamplingParams(max_tokens=16)

    engine = make_engine()
    engine.generate([first], params)
    before = engine.stats()
    [cached_out] = engine.generate([second], params)
    after = engine.stats()

    cached = (1000 // 16) * 16  # whole blocks of the shared prefix
    prompt_computed = len(second) - cached
    # Prompt tokens past the cache, plus one step per generated token after the first.
    assert after.computed_tokens - before.computed_tokens == prompt_computed + len(cached_out) - 1
    assert after.prefix_hits - before.prefix_hits == cached

    [uncached_out] = make_engine(enable_prefix_caching=False).generate([second], params)
    assert cached_out == uncached_out
