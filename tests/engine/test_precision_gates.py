"""Quality gates of the lower precisions (docs/engine.md, "Precision"): bfloat16 picks fp32's next token.

Teacher forcing through the engine itself: transformers' fp32 greedy continuation is the reference;
for each of its positions k the bf16 engine gets prompt + reference[:k] and samples one greedy token,
which must be reference[k]. Prefix caching makes each of those a short prefill over bf16 KV in the pool,
the path decode takes. fp32 itself is held to token identity by test_greedy_equivalence.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from pdserve.common.engine.sampling_params import SamplingParams
from tests.cpu import cpu_flags
from tests.engine.prompts import prompts_by_length
from tests.reference import transformers_greedy

pytestmark = pytest.mark.slow
NEW_TOKENS = 16
AGREEMENT = 0.98


@pytest.fixture(scope="module")
def references(smollm2):
    """(prompt ids, fp32 transformers' greedy continuation) over the parity prompts (1 to 1,500 tokens)."""
    _, model, tokenizer = smollm2
    return [(ids, transformers_greedy(model, ids, NEW_TOKENS)) for ids in prompts_by_length(tokenizer)]


def teacher_forced_agreement(engine, references) -> tuple[float, list[tuple[int, int]]]:
    """Share of reference positions whose next token the engine picks, and the (prompt, k) it missed."""
    missed, total = [], 0
    for p, (ids, expected) in enumerate(references):
        for k, want in enumerate(expected):
            [[got]] = engine.generate([ids + expected[:k]], SamplingParams(max_tokens=1, ignore_eos=True))
            total += 1
            if got != want:
                missed.append((p, k))
    return 1 - len(missed) / total, missed


# float16 on a CPU is converted in software unless it has AVX512-FP16 or AMX-FP16 (docs/engine.md, Precision).
FP16_CPU_FLAGS = ("avx512_fp16", "amx_fp16")


def native(dtype: str) -> bool:
    if dtype == "bfloat16":
        return True  # served wherever auto picks it, and measured here even where it does not
    return any(flag in cpu_flags() for flag in FP16_CPU_FLAGS)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_lower_precision_picks_fp32_s_next_token_at_98_percent_of_positions(make_engine, references, dtype):
    if not native(dtype):
        pytest.skip(f"{dtype}: this CPU has none of {', '.join(FP16_CPU_FLAGS)}, so torch emulates it")
    engine = make_engine(dtype)
    want = getattr(torch, dtype)
    assert engine.pool.tensor.dtype == want and next(engine.model.parameters()).dtype == want
    if dtype == "bfloat16" and "avx512f" not in cpu_flags():
        from pdserve.common.engine import kernels

        if kernels.load():  # an AVX2 CPU: this is the AVX2 gate below, on the host's own build
            assert "row kernel (bf16 weights, float32 sums)" in engine.describe()
    agreement, missed = teacher_forced_agreement(engine, references)
    assert agreement >= AGREEMENT, f"{agreement:.1%} of next tokens agree; missed (prompt, k): {missed}"
    assert engine.stats().prefix_hits > 0  # each position reused the KV of the ones before it


# The gate as an AVX2-only CPU runs bf16 (no panels: the row kernel on widened bf16), in a fresh interpreter
# held to AVX2 (bench/cpu_isa.py) whatever this host is; it prints the agreement and the missed positions.
AVX2_GATE = """
from pdserve.common import model_loader
from pdserve.common.engine.config import EngineConfig
from pdserve.common.engine.engine import LLMEngine
from tests.engine.prompts import prompts_by_length
from tests.engine.test_precision_gates import NEW_TOKENS, teacher_forced_agreement
from tests.reference import transformers_greedy

ref = model_loader.resolve(None)
fp32, tokenizer = model_loader.load(ref, dtype="float32")
references = [(ids, transformers_greedy(fp32, ids, NEW_TOKENS)) for ids in prompts_by_length(tokenizer)]
model, _ = model_loader.load(ref, dtype="bfloat16")
engine = LLMEngine(EngineConfig(num_kv_blocks=512, dtype="bfloat16"), model, tokenizer, ref)
print(engine.describe())
print(*teacher_forced_agreement(engine, references))
"""


def test_bf16_on_an_avx2_cpu_picks_fp32_s_next_token_at_98_percent_of_positions():
    import subprocess
    import sys

    from pdserve.bench import cpu_isa
    from pdserve.common.engine import kernels

    if not kernels.load() or not {"avx2", "fma"} <= cpu_flags():
        pytest.skip("no kernels to build here, or no AVX2 and FMA to run x86-64-v3 code")
    if "avx512f" not in cpu_flags():
        pytest.skip("an AVX2 CPU: the bfloat16 gate above ran this very build")

    env = {**os.environ, **cpu_isa.environment("avx2")}
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", AVX2_GATE], env=env, cwd=root, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    described, result = done.stdout.strip().splitlines()[-2:]
    assert "row kernel (bf16 weights, float32 sums)" in described
    agreement, missed = result.split(" ", 1)
    assert float(agreement) >= AGREEMENT, f"{float(agreement):.1%} of next tokens agree; missed (prompt, k): {missed}"


def test_int8_weights_pick_fp32_s_next_token_at_98_percent_of_positions(make_engine, references):
    """Weight-only int8 (quantize.py), with bf16 activations and KV."""
    from pdserve.common.engine import kernels

    if not kernels.linear_tiles():
        pytest.skip("int8 runs over packed panels (AMX or AVX512_BF16), which this CPU (or its kernel build) lacks")
    engine = make_engine("bfloat16", quantization="int8")
    assert "int8 weights" in engine.describe()
    agreement, missed = teacher_forced_agreement(engine, references)
    assert agreement >= AGREEMENT, f"{agreement:.1%} of next tokens agree; missed (prompt, k): {missed}"
