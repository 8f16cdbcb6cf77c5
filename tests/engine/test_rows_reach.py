"""How far the row kernel reaches: timed on this machine (rows_reach.py), obeyed by RowsLinear and by the
one-call decode step; in float32, and in bf16 where a CPU has no panels (no AVX512_BF16)."""

import pytest
import torch
import torch.nn.functional as F

from pdserve.common.engine import kernels, llama, rows_reach


@pytest.fixture(scope="module")
def ops():
    if not kernels.load():
        pytest.skip("the CPU kernels could not be built here (no g++?); the engine runs transformers' layers")
    return torch.ops.pdserve


@pytest.fixture(autouse=True)
def untimed_after():
    """No reach timed by a test's fake clock outlives the test."""
    yield
    rows_reach.reach.cache_clear()


def test_rows_up_to_the_reach_go_through_the_row_kernel_and_more_through_mkl(ops):
    torch.manual_seed(0)
    weight = torch.randn(48, 96)
    layer = llama.RowsLinear(weight, max_rows=32)
    x = torch.randn(33, 96)
    assert torch.equal(layer(x[:32]), ops.linear_f32(x[:32], weight))
    assert torch.equal(layer(x), F.linear(x, weight))


def test_a_bf16_layer_without_panels_rounds_the_row_kernel_s_sums_and_widens_for_mkl_past_its_reach(ops, monkeypatch):
    torch.manual_seed(0)
    weight = torch.randn(48, 96).to(torch.bfloat16)
    layer = llama.RowsLinear(weight, max_rows=32)
    x = torch.randn(33, 96).to(torch.bfloat16)
    ran = []
    for name in ("beyond", "linear_rows"):
        module = rows_reach if name == "beyond" else ops
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, real=real, name=name: ran.append(name) or real(*a))
    below, past = layer(x[:32]), layer(x)
    assert ran == ["linear_rows", "beyond"]
    assert below.dtype == past.dtype == torch.bfloat16
    assert torch.equal(below, ops.linear_f32(x[:32], weight).to(torch.bfloat16))  # float32 sums, rounded once
    assert torch.equal(past, F.linear(x.float(), weight.float()).to(torch.bfloat16))


def _timed(monkeypatch, ratios: list[float]) -> list[float]:
    """rows_reach timing `ratios` (ours over MKL's, in the order asked), uncached; returns what is left."""
    left = list(ratios)
    monkeypatch.setattr(rows_reach, "_ratio", lambda ours, theirs, reps: left.pop(0))
    rows_reach.reach.cache_clear()
    return left


def test_the_reach_is_the_last_row_count_of_an_unbroken_run_of_wins(ops, monkeypatch):
    # 32 and 64 won; 128 lost twice: 64.
    left = _timed(monkeypatch, [0.7, 0.9, 1.2, 1.1, 0.5])
    assert rows_reach.reach(24, 16, 1) == 64
    assert left == [0.5]  # no row count past the first confirmed loss is timed


def test_a_loss_counts_only_when_timed_again(ops, monkeypatch):
    left = _timed(monkeypatch, [1.3, 0.9, 1.05, 1.02])  # 32: lost, then won; 64: lost twice
    assert rows_reach.reach(24, 16, 1) == 32
    assert left == []


def test_a_machine_where_mkl_wins_at_once_keeps_the_rows_measured_everywhere(ops, monkeypatch):
    _timed(monkeypatch, [1.2, 1.4])
    assert rows_reach.reach(24, 16, 1) == rows_reach.ALWAYS == 16


def test_the_measured_reach_is_one_of_the_candidates_and_is_timed_once_a_process(ops):
    rows_reach.reach.cache_clear()
    got = rows_reach.reach(96, 48, torch.get_num_threads())
    assert got in (rows_reach.ALWAYS, *rows_reach.CANDIDATES)
    assert rows_reach.reach(96, 48, torch.get_num_threads()) == got
    assert rows_reach.reach.cache_info().hits == 1


def test_a_float32_engine_sends_decode_steps_up_to_its_reach_through_one_call(ops, tiny_model_dir, monkeypatch):
    from pdserve.common import model_loader
    from pdserve.common.engine.config import EngineConfig
    from pdserve.common.engine.engine import LLMEngine
    from pdserve.common.engine.sampling_params import SamplingParams

    if not kernels.vectorized():
        pytest.skip("float32: no row kernel here, decode steps run the layer loop")
    if kernels.float_panels():
        pytest.skip("float32 runs over panels in this build, at every row count (test_float_panels.py)")
    _timed(monkeypatch, [0.9, 1.2, 1.2])  # a reach of 32
    ref = model_loader.resolve(str(tiny_model_dir))
    model, tok = model_loader.load(ref, dtype="float32")
    engine = LLMEngine(EngineConfig(dtype="float32", num_kv_blocks=256, max_num_batched_tokens=2048), model, tok, ref)
    fused = engine.runner.fused
    assert fused.rows_reach == 32 and "up to 32 rows" in engine.describe()
    assert all(m.max_rows == 32 for m in engine.runner.model.modules() if isinstance(m, llama.RowsLinear))
    one_call, decode_layers = [], ops.decode_layers
    monkeypatch.setattr(ops, "decode_layers", lambda x, *a: one_call.append(len(x)) or decode_layers(x, *a))
    for n in (32, 33):  # a batch of 32 sequences decodes in one call; of 33, through the layer loop
        one_call.clear()
        engine.generate([[5 + i, 6, 7] for i in range(n)], SamplingParams(max_tokens=3, ignore_eos=True))
        assert one_call == ([32, 32] if n == 32 else [])


def test_a_bf16_engine_without_panels_decodes_in_one_call_the_tokens_of_its_layer_loop(
    ops, tiny_model_dir, monkeypatch
):
    """A CPU without AMX or AVX512_BF16 (no pack_vnni panels): the layers are bf16 RowsLinear, and a decode
    step's one call (decode_layers) picks the tokens the same engine's Python loop over its layers picks."""
    from pdserve.common import model_loader
    from pdserve.common.engine.config import EngineConfig
    from pdserve.common.engine.engine import LLMEngine
    from pdserve.common.engine.sampling_params import SamplingParams

    if not kernels.vectorized():
        pytest.skip("no vector kernels here: decode steps run the layer loop")
    monkeypatch.setattr(kernels, "linear_tiles", lambda: False)
    ref = model_loader.resolve(str(tiny_model_dir))
    model, tok = model_loader.load(ref, dtype="bfloat16")
    engine = LLMEngine(EngineConfig(dtype="bfloat16", num_kv_blocks=256, max_num_batched_tokens=2048), model, tok, ref)
    fused = engine.runner.fused
    assert fused.decode_by_rows and "row kernel (bf16 weights, float32 sums)" in engine.describe()
    assert all(
        m.weight.dtype == torch.bfloat16 for m in engine.runner.model.modules() if isinstance(m, llama.RowsLinear)
    )
    prompts, params = [[5 + i, 6, 7, 8] for i in range(4)], SamplingParams(max_tokens=12, ignore_eos=True)
    one_call, decode_layers = [], ops.decode_layers
    monkeypatch.setattr(ops, "decode_layers", lambda x, *a: one_call.append(len(x)) or decode_layers(x, *a))
    fused_tokens = engine.generate(prompts, params)
    assert one_call and set(one_call) == {4}
    fused.decode_weights = None  # the same layers, called op by op from Python
    assert engine.generate(prompts, params) == fused_tokens
