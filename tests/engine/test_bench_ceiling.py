"""`pdserve bench engine` measures prefill against a matmul ceiling: its FLOPs count every layer however it runs."""

import pytest
import torch

from pdserve.bench.engine_bench import flops_per_token
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
