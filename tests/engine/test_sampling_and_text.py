"""Sampling, stop conditions and streamed text."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pdserve.common.engine.detokenizer import IncrementalDetokenizer
from pdserve.common.engine.sampler import sample
from pdserve.common.engine.sampling_params import SamplingParams
from pdserve.common.engine.sequence import FinishReason
from tests.engine.prompts import chat_ids


def test_top_k_1_and_tiny_top_p_are_greedy():
    logits = torch.randn(4, 50)
    for p in (SamplingParams(temperature=1.0, top_k=1), SamplingParams(temperature=1.0, top_p=1e-6)):
        assert sample(logits, [p] * 4, [None] * 4) == logits.argmax(-1).tolist()


@pytest.mark.parametrize("temperature", [1e-45, 1e-38, 1e-20])
def test_a_tiny_temperature_samples_the_argmax_instead_of_failing(temperature):
    # Dividing unshifted logits overflowed to inf and NaN probabilities: the
    # engine step failed, and with it every request in the batch.
    logits = torch.randn(4, 50) * 30
    for p in (SamplingParams(temperature=temperature), SamplingParams(temperature=temperature, top_p=0.5, top_k=5)):
        assert sample(logits, [p] * 4, [None] * 4) == logits.argmax(-1).tolist()


def test_top_k_never_samples_outside_the_k_best():
    logits = torch.arange(20.0).unsqueeze(0)
    p = SamplingParams(temperature=5.0, top_k=3)
    gen = torch.Generator().manual_seed(0)
    drawn = {sample(logits, [p], [gen])[0] for _ in range(200)}
    assert drawn <= {17, 18, 19} and len(drawn) > 1


def test_seeded_sampling_repeats_whatever_the_batch(make_engine):
    engine = make_engine()
    p = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.95, top_k=50, seed=1234)
    [alone] = engine.generate(["Tell me a story."], p)
    together = engine.generate(["Tell me a story.", "Other prompt", "Yet another one here"], p)
    assert together[0] == alone


def test_a_seeded_stream_resumed_from_its_output_so_far_draws_the_same_tail(make_engine, smollm2):
    """Prompt + the first k tokens, with seed_offset k: the tokens the whole run drew after k."""
    engine, tokenizer = make_engine(), smollm2[2]
    prompt = tokenizer.encode("Tell me a story about a lighthouse.", add_special_tokens=False)
    p = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, seed=99, ignore_eos=True)
    [whole] = engine.generate([prompt], p)
    k = 6
    [tail] = engine.generate([prompt + whole[:k]], dataclasses.replace(p, max_tokens=16 - k, seed_offset=k))
    assert tail == whole[k:]
    [restarted] = engine.generate([prompt + whole[:k]], dataclasses.replace(p, max_tokens=16 - k))
    assert restarted != whole[k:]  # without the offset, the draws start over


def test_streamed_text_equals_decoded_tokens(make_engine, smollm2):
    _, _, tokenizer = smollm2
    engine = make_engine()
    ids = chat_ids(engine.tokenizer, "Write a haiku about snow, with emoji ❄️.")
    outs = list(engine.stream(ids, SamplingParams(max_tokens=40)))
    tokens = [t for o in outs for t in o.new_token_ids]
    text = "".join(o.text for o in outs)
    assert text == tokenizer.decode(tokens, skip_special_tokens=True)
    assert outs[-1].finished and all(not o.finished for o in outs[:-1])
    assert "\ufffd" not in text


def test_detokenizer_holds_back_incomplete_utf8(smollm2):
    _, _, tokenizer = smollm2
    ids = tokenizer.encode("snow ❄️ and 日本語 text", add_special_tokens=False)
    d = IncrementalDetokenizer(tokenizer, [])
    pieces = []
    for t in ids:
        d.add(t)
        pieces.append(d.flush(final=False))
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + d.flush(final=True) == tokenizer.decode(ids)


def test_stop_string_ends_the_request_and_is_not_streamed(make_engine):
    engine = make_engine()
    ids = chat_ids(engine.tokenizer, "What is the capital of France?")
    [full] = [t for t in [engine.generate([ids], SamplingParams(max_tokens=20))[0]]]
    full_text = engine.tokenizer.decode(full, skip_special_tokens=True)
    assert "Paris" in full_text
    outs = list(engine.stream(ids, SamplingParams(max_tokens=20, stop=["Paris"])))
    text = "".join(o.text for o in outs)
    assert outs[-1].finish_reason is FinishReason.STOP
    assert text == full_text[: full_text.index("Paris")]


def test_stop_token_ids_and_max_tokens(make_engine):
    engine = make_engine()
    ids = chat_ids(engine.tokenizer, "Count from one to twenty.")
    [full] = engine.generate([ids], SamplingParams(max_tokens=10, ignore_eos=True))
    outs = list(engine.stream(ids, SamplingParams(max_tokens=10, stop_token_ids=[full[3]])))
    stop_at = full.index(full[3])
    assert [t for o in outs for t in o.new_token_ids] == full[: stop_at + 1]  # counted, as vLLM counts it
    assert outs[-1].finish_reason is FinishReason.STOP
    # Its text is not the answer's, as vLLM leaves it out (without include_stop_str_in_output).
    assert "".join(o.text for o in outs) == engine.tokenizer.decode(full[:stop_at], skip_special_tokens=True)
    outs = list(engine.stream(ids, SamplingParams(max_tokens=5, ignore_eos=True)))
    assert len(outs) == 5 and outs[-1].finish_reason is FinishReason.LENGTH
