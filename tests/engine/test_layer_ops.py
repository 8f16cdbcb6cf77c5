"""pdserve's fused layer kernels (kernels/layer_ops.cpp, linear.cpp, greedy.cpp) against the torch ops they replace.

In bfloat16 each must give transformers' modules' result bit for bit (they round where those round);
in float32 within a few ulps. The float32 logits from bf16 weights are every product summed in float32.
"""

import pytest
import torch
import torch.nn.functional as F

from pdserve.common.engine import kernels, llama

EPS = 1e-5


@pytest.fixture(scope="module")
def ops():
    if not kernels.load():
        pytest.skip("the CPU kernels could not be built here (no g++?); the engine runs transformers' layers")
    return torch.ops.pdserve


def _rms_reference(x, w):  # transformers' LlamaRMSNorm
    h = x.float()
    return w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS)).to(x.dtype)


def _same(got, want, dtype):
    if dtype == torch.bfloat16:
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rms_norm_and_the_residual_add_before_it_match_transformers(ops, dtype):
    torch.manual_seed(0)
    x, residual, w = torch.randn(7, 100, dtype=dtype), torch.randn(7, 100, dtype=dtype), torch.randn(100, dtype=dtype)
    _same(ops.rms_norm(x, w, EPS), _rms_reference(x, w), dtype)  # 100: vector lanes and a tail
    updated = residual.clone()
    out = ops.add_rms_norm(x, updated, w, EPS)
    assert torch.equal(updated, residual + x)  # the residual is updated in place, rounded as a torch add
    _same(out, _rms_reference(residual + x, w), dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_silu_mul_matches_silu_of_gate_times_up(ops, dtype):
    torch.manual_seed(1)
    gate_up = torch.randn(5, 2 * 200, dtype=dtype) * 6  # large negative and positive gates
    gate_up[0, :3] = torch.tensor([-200.0, 0.0, 200.0])
    gate, up = gate_up.chunk(2, dim=-1)
    _same(ops.silu_mul(gate_up), F.silu(gate) * up, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rope_cache_rotates_q_and_k_and_writes_k_and_v_into_their_slots_only(ops, dtype):
    torch.manual_seed(2)
    tokens, heads, kv_heads, d = 6, 9, 3, 64
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * d, dtype=dtype)
    angles = torch.randn(tokens, d // 2)
    cos, sin = (f(torch.cat([angles, angles], -1)).to(dtype) for f in (torch.cos, torch.sin))
    cache = torch.full((4, 2, 2, 16, kv_heads, d), float("nan"), dtype=dtype)
    blocks, offsets = torch.tensor([1, 1, 3, 3, 0, 2]), torch.tensor([0, 5, 2, 15, 7, 9])
    q = ops.rope_cache(qkv, cos, sin, cache, 1, blocks, offsets, heads, kv_heads)

    def rotated(x):  # transformers' apply_rotary_pos_emb
        half = torch.cat([-x[..., d // 2 :], x[..., : d // 2]], -1)
        return x * cos[:, None] + half * sin[:, None]

    q_ref, k_ref, v_ref = qkv.view(tokens, heads + 2 * kv_heads, d).split([heads, kv_heads, kv_heads], dim=1)
    _same(q, rotated(q_ref), dtype)
    _same(cache[blocks, 1, 0, offsets], rotated(k_ref), dtype)
    assert torch.equal(cache[blocks, 1, 1, offsets], v_ref)
    written = torch.zeros(cache.shape[:4], dtype=torch.bool)
    written[blocks, 1, :, offsets] = True
    assert cache[~written].isnan().all()  # nothing else in the pool changed


@pytest.mark.parametrize("rows,k", [(1, 576), (5, 576), (9, 100)])  # 9 and 100: row blocks and a K tail
def test_float32_logits_sum_every_bf16_product_in_float32_whatever_the_batch(ops, rows, k):
    torch.manual_seed(3)
    x, w = torch.randn(rows, k, dtype=torch.bfloat16), torch.randn(1003, k, dtype=torch.bfloat16)
    logits = ops.linear_f32(x, w)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, x.float() @ w.float().T, atol=1e-4, rtol=1e-5)
    for i in range(rows):  # a row's logits do not depend on what else is in the batch
        assert torch.equal(ops.linear_f32(x[i : i + 1], w)[0], logits[i])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
# 2 and 3 rows: their own weight groups on AVX2; 1003 columns: a chunk's rounding tail
@pytest.mark.parametrize("rows,k", [(1, 576), (2, 576), (3, 100), (5, 576), (9, 100)])
def test_the_row_kernel_sums_in_float32_and_rounds_once_into_the_layer_s_dtype_whatever_the_batch(ops, dtype, rows, k):
    torch.manual_seed(5)
    x, w = torch.randn(rows, k, dtype=dtype), torch.randn(1003, k, dtype=dtype)
    out = ops.linear_rows(x, w)
    assert out.dtype == dtype
    exact = x.double() @ w.double().T
    tolerance = {"atol": 1e-4, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 1.6e-2}  # bf16's
    torch.testing.assert_close(out.double(), exact, **tolerance)
    if dtype == torch.bfloat16:  # the float32 sums (the LM head's op), rounded once: not per product
        assert torch.equal(out, ops.linear_f32(x, w).to(dtype))
    for i in range(rows):
        assert torch.equal(ops.linear_rows(x[i : i + 1], w)[0], out[i])


def test_greedy_argmax_is_torch_max_indices_with_ties_infinities_and_nans(ops):
    torch.manual_seed(4)
    logits = torch.randn(8, 1003)  # 1003: whole chunks and a tail
    logits[1, [70, 900]] = 50.0  # a tie: the first
    logits[2] = float("-inf")  # nothing finite: the first
    logits[3, 999] = 1e38  # in the tail
    logits[4, [5, 600]] = float("nan")  # a NaN wins over any number: the first NaN
    logits[4, 300] = 1e38
    logits[5, 64] = float("inf")  # a chunk's first
    got = ops.argmax_rows(logits)
    assert got.dtype == torch.int64
    assert got.tolist() == logits.max(dim=-1).indices.tolist()
    assert got[:6].tolist()[1:] == [70, 0, 999, 5, 64]


def test_a_model_that_is_not_laid_out_as_llama_keeps_transformers_layers(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert llama.unsupported(model) == ""
    model.config.hidden_act = "gelu"
    assert llama.unsupported(model) == "activation gelu"
    model.config.hidden_act = "silu"
    model.model.layers[0].self_attn.q_norm = torch.nn.Identity()  # Qwen3-style q/k norms
    assert llama.unsupported(model) == "attention other than Llama's"


@pytest.fixture(scope="module")
def panels(ops):
    if not kernels.linear_tiles():
        pytest.skip("this CPU has neither AMX nor AVX512_BF16 (or no kernels built): oneDNN runs every matmul")


@pytest.mark.parametrize("out_features", [96, 1056])  # 1,056: more column pairs than a block of them
def test_panels_compute_what_onednn_computes_at_every_row_count(ops, panels, out_features):
    torch.manual_seed(4)
    w = torch.randn(out_features, 64, dtype=torch.bfloat16)
    tiles = ops.pack_vnni(w)
    onednn = torch.ops.mkldnn._reorder_linear_weight(w, 1)
    for rows in (1, 15, 16, 17, 33, 70, 300):  # partial and whole blocks of 16 rows, one and two of them a pass
        x = torch.randn(rows, 64, dtype=torch.bfloat16)
        got = ops.linear_tiles(x, tiles, out_features)
        assert torch.equal(got, torch.ops.mkldnn._linear_pointwise(x, onednn, None, "none", [], ""))  # same bits
        torch.testing.assert_close(got.float(), x.float() @ w.float().T, atol=0.1, rtol=1e-2)
        torch.testing.assert_close(ops.linear_f32(x, w, tiles), x.float() @ w.float().T, atol=1e-4, rtol=1e-5)
    assert not ops.pack_vnni(torch.randn(40, 64, dtype=torch.bfloat16)).numel()  # 40 rows: not whole tiles


def test_gate_up_with_silu_in_its_epilogue_gives_silu_mul_of_the_matmul_bit_for_bit(ops, panels):
    """The MLP's gate_up matmul hands its float32 sums to SiLU in place: the bf16 result of the two ops."""
    torch.manual_seed(5)
    inter = 544  # 34 panels of gate, 34 of up
    w = torch.randn(2 * inter, 64, dtype=torch.bfloat16)
    tiles = ops.pack_vnni(w)
    for rows in (1, 17, 300):
        x = torch.randn(rows, 64, dtype=torch.bfloat16) * 2
        gate_up = ops.linear_tiles(x, tiles, 2 * inter)
        gate, up = gate_up.chunk(2, dim=-1)
        got = ops.gate_up_silu(x, tiles, inter)
        assert torch.equal(got, ops.silu_mul(gate_up))
        assert torch.equal(got, F.silu(gate) * up)


@pytest.mark.parametrize("d", [64, 128])
def test_qkv_with_rope_and_the_cache_write_in_its_epilogue_gives_rope_cache_of_the_matmul_bit_for_bit(ops, panels, d):
    """The q/k/v matmul rotates q and k and writes k and v to their slots as it stores: the two ops' bits."""
    torch.manual_seed(6)
    heads, kv_heads, hidden = 9, 3, 96
    w = torch.randn((heads + 2 * kv_heads) * d, hidden, dtype=torch.bfloat16) * 0.2
    tiles = ops.pack_vnni(w)
    for rows in (1, 17, 300):
        x = torch.randn(rows, hidden, dtype=torch.bfloat16)
        angles = torch.randn(rows, d // 2)
        cos, sin = (f(torch.cat([angles, angles], -1)).to(torch.bfloat16) for f in (torch.cos, torch.sin))
        slots = torch.randperm(5 * 64)[:rows]  # 5 blocks of 64 slots, in any order
        blocks, offsets = slots // 64, slots % 64
        fused, separate = (torch.full((5, 2, 2, 64, kv_heads, d), float("nan"), dtype=torch.bfloat16) for _ in "ab")
        q = ops.qkv_rope_cache(x, tiles, cos, sin, fused, 1, blocks, offsets, heads, kv_heads)
        q_ref = ops.rope_cache(
            ops.linear_tiles(x, tiles, w.shape[0]), cos, sin, separate, 1, blocks, offsets, heads, kv_heads
        )
        assert torch.equal(q, q_ref)
        assert torch.equal(fused.isnan(), separate.isnan())  # the same slots written, nothing else
        assert torch.equal(fused.nan_to_num(), separate.nan_to_num())


# 7 panels, the last pair with one; and 33 pairs of K 1,024, more than a thread's block of panels (1 MB)
@pytest.mark.parametrize("hidden,inner", [(112, 64), (1056, 1024)])
def test_a_matmul_with_the_residual_add_and_norm_in_its_epilogue_gives_add_rms_norm_of_it_bit_for_bit(
    ops, panels, hidden, inner
):
    """o_proj and down_proj add into the residual and normalize it as they store: the two ops' bits."""
    torch.manual_seed(7)
    w = torch.randn(hidden, inner, dtype=torch.bfloat16) * 0.3
    tiles = ops.pack_vnni(w)
    norm = torch.rand(hidden, dtype=torch.bfloat16) + 0.5
    for rows in (1, 17, 64, 300):
        x = torch.randn(rows, inner, dtype=torch.bfloat16)
        fused, separate = (torch.randn(rows, hidden, dtype=torch.bfloat16) for _ in "ab")
        separate.copy_(fused)
        got = ops.linear_add_rms_norm(x, tiles, fused, norm, EPS)
        want = ops.add_rms_norm(ops.linear_tiles(x, tiles, hidden), separate, norm, EPS)
        assert torch.equal(fused, separate)  # the residual, added to in place
        assert torch.equal(got, want)


def _recording(run, logits: list):
    def recorded(batch):
        seqs, out = run(batch)
        logits.append(out)
        return seqs, out

    return recorded


@pytest.mark.parametrize(("dtype", "quantization"), [("bfloat16", "none"), ("bfloat16", "int8"), ("float32", "none")])
def test_a_decode_step_in_one_call_gives_the_layer_loops_logits_bit_for_bit(
    ops, tiny_model_dir, monkeypatch, dtype, quantization
):
    """With packed panels (bf16: AMX tiles or AVX512_BF16 vectors) or the row kernel (float32) for every
    matmul, a decode step's layers run in one C++ call (decode_layers.cpp)."""
    from pdserve.common import model_loader
    from pdserve.common.engine.config import EngineConfig
    from pdserve.common.engine.engine import LLMEngine
    from pdserve.common.engine.sampling_params import SamplingParams

    ref = model_loader.resolve(str(tiny_model_dir))
    one_call, decode_layers = [], ops.decode_layers
    monkeypatch.setattr(ops, "decode_layers", lambda *a: one_call.append(1) or decode_layers(*a))
    logits = {}
    for loop in (False, True):
        model, tok = model_loader.load(ref, dtype=dtype)
        if quantization == "int8" and not kernels.linear_tiles():
            pytest.skip("int8 runs over packed panels (AMX or AVX512_BF16), which this CPU (or its kernel build) lacks")
        if not (kernels.linear_tiles() if dtype == "bfloat16" else kernels.vectorized()):
            pytest.skip(f"{dtype}: no fused kernels for its matmuls here, decode steps run the layer loop")
        config = EngineConfig(dtype=dtype, num_kv_blocks=64, quantization=quantization)
        engine = LLMEngine(config, model, tok, ref)
        fused = engine.runner.fused
        assert fused is not None and fused.decode_weights is not None
        if loop:
            fused.decode_weights = None
        logits[loop] = []
        monkeypatch.setattr(engine.runner, "run", _recording(engine.runner.run, logits[loop]))
        engine.generate([[5, 6, 7], list(range(100, 140)), list(range(9, 29))], SamplingParams(max_tokens=12))
    assert len(one_call) == 11  # every step after the prompts' (prefill) one
    assert len(logits[False]) == len(logits[True]) == 12
    assert all(torch.equal(a, b) for a, b in zip(logits[False], logits[True]))
