"""`pdserve bench engine` measures prefill against a matmul ceiling (its FLOPs count every layer however it
runs), and times decode steps of the batch it names."""

import pytest
import torch

from pdserve.bench.engine_bench import decode_steps, flops_per_token
from pdserve.common import model_loader
from pdserve.common.engine.config import EngineConfig
from pdserve.common.engine.engine import LLMEngine


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])  # bf16: fused, through AMX tiles where the CPU has them
def test_the_prefill_ceiling_counts_every_linear_layer_but_the_head_as_the_engine_runs_it(tiny_model_dir, dtype):
    ref = model_loader.resolve(str(tiny_model_dir))
    model, tok = model_loader.load(ref, dtype=dtype)
    cfg = model.config
    linear = sum(
        m.weight.numel() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"
    )
    attention = 4 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * 512
    engine = LLMEngine(EngineConfig(dtype=dtype, num_kv_blocks=16), model, tok, ref)
    assert flops_per_token(engine.model, 512) == 2 * linear + attention


def test_every_timed_decode_step_has_every_sequence_of_the_batch(tiny_model_dir, monkeypatch):
    from pdserve.bench import engine_bench

    ref = model_loader.resolve(str(tiny_model_dir))
    model, tok = model_loader.load(ref, dtype="float32")
    config = EngineConfig(dtype="float32", num_kv_blocks=256, max_num_batched_tokens=64)
    engine = LLMEngine(config, model, tok, ref)
    batches = []

    def timed(runs, reps):  # alternated_times, counting the decoding sequences of each step
        for _ in range(1 + reps):
            batches.append(sum(s.num_computed_tokens >= s.num_prompt_tokens for s in engine.scheduler.running))
            runs["step"]()
        return {"step": [1.0] * reps}

    monkeypatch.setattr(engine_bench, "alternated_times", timed)
    decode_steps(engine, 8, 96, 4)  # 8 prompts of 96 take 12+ chunked steps, and the first decode meanwhile
    assert batches == [8] * 5


def test_bf16_figures_against_torch_are_skipped_where_torch_emulates_bf16(monkeypatch):
    """A ceiling or a transformers loop in emulated bf16 (0.3 GFLOP/s held to AVX2) would flatter the engine."""
    from pdserve.bench.engine_bench import emulated
    from pdserve.common.engine import precision

    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # as `--as-cpu avx2` holds oneDNN
    assert "emulated" in emulated("bfloat16")
    assert emulated("float32") == ""
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    assert (emulated("bfloat16") == "") == (precision.cpu_bf16_flag() is not None)
