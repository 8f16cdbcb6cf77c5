"""float32 weights packed into 16-column panels (kernels/float_panels.h), where the kernels are built for
AVX2: every output one float32 sum over k in order, whatever the batch; the engine keeps its float32
weights only as panels, a tied head's too, and decodes any number of sequences in one call."""

import pytest
import torch

from pdserve.common import model_loader
from pdserve.common.engine import kernels, llama
from pdserve.common.engine.config import EngineConfig
from pdserve.common.engine.engine import LLMEngine
from pdserve.common.engine.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def ops():
    if not (kernels.load() and kernels.float_panels()):
        pytest.skip("no float32 panels in this build: AVX2 builds have them (AVX-512 keeps the row kernel)")
    return torch.ops.pdserve


# 1-6 rows: each its own block of rows by panels; 7, 13, 100: blocks of 6 and a tail. 1,008 columns:
# 63 panels, so groups of 4 with a tail of 3. K = 1,536: x's chunk in L2 is 42 rows, so 100 rows take 3.
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 6, 7, 13, 100])
@pytest.mark.parametrize("k", [1, 100, 1536])
def test_panels_sum_every_output_in_float32_whatever_the_batch(ops, rows, k):
    torch.manual_seed(3)
    x, w = torch.randn(rows, k), torch.randn(1008, k)
    packed = ops.pack_float_panels(w)
    out = ops.linear_float_panels(x, packed, 1008)
    torch.testing.assert_close(out.double(), x.double() @ w.double().T, atol=2e-4, rtol=1e-5)
    for i in (0, rows - 1):
        assert torch.equal(ops.linear_float_panels(x[i : i + 1], packed, 1008)[0], out[i])


def test_only_float32_weights_of_whole_panels_are_packed(ops):
    assert ops.pack_float_panels(torch.randn(40, 64)).numel() == 0  # 40 rows: not whole panels
    assert ops.pack_float_panels(torch.randn(48, 64, dtype=torch.bfloat16)).numel() == 0
    assert ops.pack_float_panels(torch.randn(48, 64)).numel() == 48 * 64
    with pytest.raises(RuntimeError, match="pack_float_panels of"):
        ops.linear_float_panels(torch.randn(2, 64), torch.randn(48 * 64), 40)


@pytest.fixture(scope="module")
def engine(ops, tiny_model_dir):
    ref = model_loader.resolve(str(tiny_model_dir))
    model, tok = model_loader.load(ref, dtype="float32")
    return LLMEngine(EngineConfig(dtype="float32", num_kv_blocks=256, max_num_batched_tokens=2048), model, tok, ref)


def test_a_float32_engine_keeps_each_weight_once_as_panels_its_tied_embedding_in_the_head_s(engine, tiny_model_dir):
    fused = engine.runner.fused
    projections = [p for la in fused.layers for p in (la.qkv_proj, la.o_proj, la.gate_up_proj, la.down_proj)]
    assert all(isinstance(p, llama.FloatPanelLinear) for p in (*projections, fused.lm_head))
    assert "over float32 panels" in engine.describe()
    assert engine.model.model.embed_tokens.weight.numel() == 0  # one copy: the head's panels
    original, _ = model_loader.load(model_loader.resolve(str(tiny_model_dir)), dtype="float32")
    ids = torch.tensor([0, 15, 16, 17, original.config.vocab_size - 1])
    assert torch.equal(fused.embed(ids), original.model.embed_tokens(ids))


def test_forty_sequences_decode_in_one_call_a_step(engine, monkeypatch):
    ops = torch.ops.pdserve
    one_call, decode_layers = [], ops.decode_layers
    monkeypatch.setattr(ops, "decode_layers", lambda x, *a: one_call.append(len(x)) or decode_layers(x, *a))
    engine.generate([[5 + i, 6, 7] for i in range(40)], SamplingParams(max_tokens=3, ignore_eos=True))
    assert one_call == [40, 40]
