"""The Llama family DESIGN.md names, beyond Llama itself: Qwen2 (biased q/k/v projections),
Qwen3 (q/k norms) and Mistral (a sliding window), each a tiny random model that the engine
runs token for token as transformers does."""

from __future__ import annotations

import pytest

from pdserve.common.engine.config import EngineConfig
from pdserve.common.engine.engine import LLMEngine
from pdserve.common.engine.sampling_params import SamplingParams
from pdserve.common.errors import InvalidRequestError
from tests.reference import transformers_greedy


def _tiny(tmp_path, tokenizer, family: str, **extra):
    import torch
    import transformers

    config_class, model_class = {
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }[family]
    torch.manual_seed(0)
    config = config_class(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **extra,
    )
    model = model_class(config)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    return model.eval()


def _greedy(engine: LLMEngine, prompts: list[list[int]], n: int) -> list[list[int]]:
    ids = [engine.add_request(p, SamplingParams(max_tokens=n, ignore_eos=True)) for p in prompts]
    out = {i: [] for i in ids}
    while engine.has_unfinished():
        for o in engine.step():
            out[o.request_id] += o.new_token_ids
    return [out[i] for i in ids]


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "mistral"])
def test_each_family_generates_what_transformers_generates(tmp_path, smollm2_tokenizer, family):
    model = _tiny(tmp_path, smollm2_tokenizer, family)
    prompts = [[100 + i for i in range(5)], [(7 * i) % 5000 + 50 for i in range(150)]]  # one chunked (budget 64)
    engine = LLMEngine(EngineConfig(model=str(tmp_path), dtype="float32", max_num_batched_tokens=64))
    assert _greedy(engine, prompts, 12) == [transformers_greedy(model, p, 12) for p in prompts]


def test_a_sliding_window_model_serves_contexts_up_to_its_window(tmp_path, smollm2_tokenizer):
    # Within the window, attending over the whole context is the model's own attention.
    model = _tiny(tmp_path, smollm2_tokenizer, "mistral", sliding_window=48)
    engine = LLMEngine(EngineConfig(model=str(tmp_path), dtype="float32"))  # as transformers' reference
    assert engine.max_model_len == 48
    prompt = [200 + i for i in range(30)]
    assert _greedy(engine, [prompt], 17) == [transformers_greedy(model, prompt, 17)]  # 47 tokens: all in the window
    with pytest.raises(InvalidRequestError) as err:
        engine.add_request([200] * 48, SamplingParams(max_tokens=1))
    assert err.value.field == "prompt"
