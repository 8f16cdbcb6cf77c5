"""Shared fixtures: the real SmolLM2 model, and a tiny random model of the same family.
Every test that loads SmolLM2 is marked `slow` here, so `pytest -m "not slow"` is the fast loop."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Fixtures that load SmolLM2's weights, in this process or in the suite's processes.
LOADS_THE_MODEL = frozenset({"smollm2", "make_engine", "start_suite", "cluster"})
E2E = Path(__file__).parent / "e2e"  # every test there starts a suite of real processes


def pytest_collection_modifyitems(items) -> None:
    for item in items:
        if LOADS_THE_MODEL & set(getattr(item, "fixturenames", ())) or item.path.is_relative_to(E2E):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def smollm2():
    """(ref, model, tokenizer) of the bundled SmolLM2-135M-Instruct, sdpa attention (the reference)."""
    from pdserve.common import model_loader

    ref = model_loader.resolve()
    model, tokenizer = model_loader.load(ref)
    return ref, model, tokenizer


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """SmolLM2's tokenizer, without its weights; from $PDSERVE_TEST_TOKENIZER (a directory of
    its files) where the model package cannot travel (the GPU machine), else from the bundled model."""
    from transformers import AutoTokenizer

    from pdserve.common import model_loader

    path = os.environ.get("PDSERVE_TEST_TOKENIZER") or model_loader.resolve(weights=False).path
    return AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_tokenizer):
    """A 2-layer randomly initialised Llama with SmolLM2's tokenizer: fast to run."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = smollm2_tokenizer
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def make_engine(smollm2):
    """make(dtype="float32", **EngineConfig overrides): an LLMEngine on SmolLM2 (its own copy of the
    weights in `dtype`, paged attention). float32 unless asked: tests compare with transformers' fp32."""
    from pdserve.common import model_loader
    from pdserve.common.engine.config import EngineConfig
    from pdserve.common.engine.engine import LLMEngine

    ref, _, tokenizer = smollm2

    def make(dtype: str = "float32", **overrides) -> LLMEngine:
        model, _ = model_loader.load(ref, dtype=dtype)
        config = EngineConfig(**{"num_kv_blocks": 512, "dtype": dtype, **overrides})
        return LLMEngine(config, model, tokenizer, ref)

    return make
