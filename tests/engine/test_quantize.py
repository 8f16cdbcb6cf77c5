"""Weight-only int8 (quantize.py): what it stores, what it computes, and who may pair with it.

Its quality gate (>= 98% of fp32's teacher-forced next tokens) is in test_precision_gates.py.
"""

import pytest
import torch
from torch import nn

from pdserve.common.config import SettingError
from pdserve.common.engine import kernels, quantize
from pdserve.common.engine.config import EngineConfig


@pytest.fixture(scope="module")
def panels():
    if not kernels.linear_tiles():
        pytest.skip("int8 runs over packed panels (AMX or AVX512_BF16), which this CPU (or its kernel build) lacks")


def test_an_int8_linear_stores_a_byte_a_weight_and_computes_within_its_rounding(panels):
    torch.manual_seed(0)
    lin = nn.Linear(96, 48, bias=True, dtype=torch.bfloat16)
    q = quantize.Int8Linear(lin.weight, lin.bias)
    assert q.qweight.dtype == torch.int8 and q.qweight.numel() == 48 * 96 and q.scales.shape == (48,)
    rows = q.qweight.view(3, 3, 16, 16, 2).permute(0, 3, 1, 2, 4).reshape(48, 96)  # out of the tiles' layout
    dequantized = rows.float() * q.scales[:, None]
    assert (dequantized - lin.weight.float()).abs().max() <= q.scales.max() / 2 * 1.01  # half a step at most
    x = torch.randn(3, 5, 96, dtype=torch.bfloat16)
    want = x.float() @ dequantized.T + lin.bias.float()
    got = q(x)
    assert got.shape == (3, 5, 48) and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=0.05, rtol=0.02)
    flat = torch.cat([x.view(15, 96), torch.randn(25, 96, dtype=torch.bfloat16)])
    torch.testing.assert_close(q(flat).float(), flat.float() @ dequantized.T + lin.bias.float(), atol=0.05, rtol=0.02)
    # A row's result does not depend on the rows beside it: on vectors, int8 is widened in registers
    # up to 16 rows and into a buffer past them, with the same bits.
    for m in (1, 7, 15, 17, 40):
        assert torch.equal(q(flat[:m])[-1], q(flat[m - 1 : m])[0])


def test_int8_is_refused_where_its_kernel_cannot_run():
    with pytest.raises(SettingError, match="bfloat16 activations"):
        quantize.check_usable(torch.float32)


def test_every_linear_layer_but_the_lm_head_is_quantized_and_the_bytes_say_so(panels, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, torch_dtype=torch.bfloat16)
    before = sum(p.numel() * p.element_size() for p in model.parameters())
    linear = sum(m.weight.numel() for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head")
    rows = sum(m.weight.shape[0] for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head")
    assert quantize.weight_bytes(model) == before - linear * 2 + linear + rows * 2  # a byte a weight, a scale a row
    assert quantize.quantize_linears(model) == 2 * 7  # q, k, v, o, gate, up, down in each of 2 layers
    assert isinstance(model.lm_head, nn.Linear)
    assert not any(isinstance(m, nn.Linear) for n, m in model.named_modules() if n != "lm_head")


def test_int8_engines_pair_only_with_int8_engines(panels, make_engine):
    plain, int8 = make_engine("bfloat16"), make_engine("bfloat16", quantization="int8")
    assert plain.spec.fingerprint != int8.spec.fingerprint  # their KV differ: no pairing, no shared store blocks
    assert plain.spec.block_bytes == int8.spec.block_bytes
    assert int8.weight_bytes < 0.65 * plain.weight_bytes  # the layers halve; the embedding (the head) stays


@pytest.mark.parametrize(
    "kwargs,match",
    [({"quantization": "int4"}, "must be one of none, int8"), ({"quantization": "int8", "device": "cuda"}, "CPU only")],
)
def test_a_quantization_the_engine_cannot_run_is_refused(kwargs, match):
    with pytest.raises(SettingError, match=match):
        EngineConfig(**kwargs)


def test_up_gives_every_model_worker_its_quantization_and_the_worker_its_engine():
    from pdserve import launcher
    from pdserve.common.worker_config import WorkerConfig

    services = launcher.plan("disaggregated", 1, 1, python="py", quantization="int8")
    given = {s.name: s.argv[s.argv.index("--quantization") + 1] for s in services if "--quantization" in s.argv}
    assert given == {"prefill-0": "int8", "decode-0": "int8"}
    assert WorkerConfig(quantization="int8").engine_config().quantization == "int8"
    assert WorkerConfig().engine_config().quantization == "none"
