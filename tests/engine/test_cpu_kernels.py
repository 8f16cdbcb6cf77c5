"""The CPU fast paths: oneDNN-packed linear layers and the paged decode-attention kernel.

Each must compute what the plain torch path computes; the engine gives the
same greedy tokens with them on and off.
"""

import shutil
import subprocess

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pdserve.common.engine import kernels
from pdserve.common.engine.packed_linear import can_pack, pack_linears
from pdserve.common.engine.sampling_params import SamplingParams

BLOCK = 16


@pytest.fixture(scope="module")
def paged_decode():
    if not kernels.load():
        pytest.skip("the CPU kernel could not be built here (no g++?); the torch path is tested everywhere")
    return torch.ops.pdserve.paged_decode


def _reference(q, cache, layer, tables, lens, scale):
    """SDPA over each sequence's gathered blocks, in float32."""
    out = []
    for i, ctx in enumerate(lens.tolist()):
        blocks = tables[i, : (ctx + BLOCK - 1) // BLOCK]
        k, v = (cache[blocks, layer, j].reshape(-1, *cache.shape[-2:])[:ctx].transpose(0, 1).float() for j in (0, 1))
        out.append(
            F.scaled_dot_product_attention(q[i].float().unsqueeze(1), k, v, scale=scale, enable_gqa=True).squeeze(1)
        )
    return torch.stack(out)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("head_dim", [64, 128, 40])  # 64, 128: the unrolled paths; 40: the generic one
def test_paged_decode_matches_sdpa_over_gathered_blocks(paged_decode, dtype, tol, head_dim):
    torch.manual_seed(0)
    num_blocks, layers, kv_heads, heads = 64, 3, 3, 9
    cache = torch.randn(num_blocks, layers, 2, BLOCK, kv_heads, head_dim, dtype=dtype)
    # Ragged, on and off block edges, and over one to four of the kernel's 128-key spans.
    lens = torch.tensor([1, BLOCK, BLOCK + 1, 200, 37, 128, 129, 500])
    tables = torch.stack([torch.randperm(num_blocks)[:32] for _ in lens])  # scattered, unordered blocks
    q = torch.randn(len(lens), heads, head_dim, dtype=dtype)
    scale = head_dim**-0.5
    for layer in range(layers):
        got = paged_decode(q, cache, layer, tables, lens, scale)
        assert got.dtype == dtype and got.shape == q.shape
        torch.testing.assert_close(got.float(), _reference(q, cache, layer, tables, lens, scale), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])  # bf16: AMX tiles where present
def test_paged_decode_uses_only_the_keys_in_its_table(paged_decode, dtype, tol):
    """Keys past a sequence's context, and blocks outside its table, never reach its result: NaN there
    changes nothing."""
    torch.manual_seed(1)
    cache = torch.full((16, 2, 2, BLOCK, 3, 64), float("nan"), dtype=dtype)
    tables = torch.tensor([[5, 2, 9], [11, 0, 0]])  # the second pads its table with block 0
    lens = torch.tensor([40, 7])
    for i, ctx in enumerate(lens.tolist()):
        for b, block in enumerate(tables[i].tolist()):
            used = min(BLOCK, ctx - b * BLOCK)
            if used > 0:
                cache[block, :, :, :used] = torch.randn(2, 2, used, 3, 64)
    q = torch.randn(2, 9, 64, dtype=dtype)
    got = paged_decode(q, cache, 1, tables, lens, 0.125)
    assert torch.isfinite(got).all()
    want = _reference(q, torch.nan_to_num(cache), 1, tables, lens, 0.125)
    torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_linear_computes_what_linear_computes(dtype):
    if not can_pack("cpu", dtype):
        pytest.skip(f"oneDNN cannot pack {dtype} weights on this machine")
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(48, 96, dtype=dtype), nn.ReLU(), nn.Linear(96, 32, bias=False, dtype=dtype))
    x = torch.randn(3, 5, 48, dtype=dtype)  # [batch, tokens, features], as transformers calls it
    with torch.inference_mode():
        want = model(x)
        assert pack_linears(model) == 2
        got = model(x)
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_engine_gives_the_same_tokens_with_and_without_the_fast_paths(make_engine):
    prompts = [[100 + i for i in range(n)] for n in (5, 40, 130)]  # different contexts in one decode batch
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    fast = make_engine()
    plain = make_engine(pack_weights=False, paged_kernel=False, fused_layers=False)
    assert plain.runner.packed_linears == 0 and not plain.runner.paged_kernel and plain.runner.fused is None
    f = fast.runner.fused  # float32 matmuls on the row kernel, or over float32 panels
    fused_own = f.rows + f.float_panels if f else 0
    assert fast.runner.packed_linears + fused_own > 0 and fast.runner.paged_kernel == kernels.load()
    assert (fast.runner.fused is not None) == kernels.vectorized()
    assert "decode attention" in fast.describe() and "transformers layers (turned off)" in plain.describe()
    assert fast.generate(prompts, params) == plain.generate(prompts, params)


def test_a_missing_compiler_is_an_error_the_engine_can_fall_back_from(tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-pdserve")
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
        kernels.build(tmp_path / "paged_decode.so")
    assert not (tmp_path / "paged_decode.so").exists()


def test_the_built_kernels_prefetch_the_decode_rows(paged_decode):
    """GCC deleted a helper's prefetches once, silently (its kernels ran 30% slower): they must be in the build."""
    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("no objdump to read the build with")
    code = subprocess.run([objdump, "-d", str(kernels.library_path())], capture_output=True, text=True, check=True)
    assert "prefetcht0" in code.stdout and "prefetcht1" in code.stdout


def test_decode_tiles_are_for_bf16_on_amx_with_heads_and_blocks_they_hold(paged_decode):
    amx = kernels.amx()  # the same CPU features and tile permission
    assert kernels.decode_tiles(torch.bfloat16, 9, 64, 16) == amx
    assert kernels.decode_tiles(torch.bfloat16, 16, 128, 32) == amx
    assert not kernels.decode_tiles(torch.float32, 9, 64, 16)
    assert not kernels.decode_tiles(torch.bfloat16, 9, 64, 8)  # a tile's 16 rows would cross blocks
    assert not kernels.decode_tiles(torch.bfloat16, 17, 64, 16)  # more query heads than a tile's columns
    assert not kernels.decode_tiles(torch.bfloat16, 9, 40, 16)


def test_a_context_past_its_block_table_is_refused(paged_decode):
    cache = torch.zeros(4, 1, 2, BLOCK, 3, 64)
    with pytest.raises(RuntimeError, match="outside its block table"):
        paged_decode(torch.zeros(1, 9, 64), cache, 0, torch.tensor([[0, 1]]), torch.tensor([2 * BLOCK + 1]), 0.125)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_sequence_alone_gets_the_bits_it_gets_in_a_batch(paged_decode, dtype):
    """Its keys are split into spans of a fixed size whatever the batch, so its result can't depend on it."""
    torch.manual_seed(2)
    cache = torch.randn(32, 1, 2, BLOCK, 3, 64, dtype=dtype)
    tables = torch.stack([torch.randperm(32)[:20] for _ in range(8)])
    lens = torch.tensor([300, 17, 64, 250, 5, 99, 128, 300])
    q = torch.randn(8, 9, 64, dtype=dtype)
    batched = paged_decode(q, cache, 0, tables, lens, 0.125)
    for i in range(8):
        alone = paged_decode(q[i : i + 1], cache, 0, tables[i : i + 1], lens[i : i + 1], 0.125)
        assert torch.equal(alone[0], batched[i])
