"""Where a fused float32 model keeps its row-kernel weights: one mapping, in the order a decode step reads
them, in huge pages where the kernel gives them, and a tied head still the embedding (docs/engine.md,
"Weights in huge pages")."""

from __future__ import annotations

from pathlib import Path

import pytest

from pdserve.common import model_loader
from pdserve.common.engine.config import EngineConfig
from pdserve.common.engine.engine import LLMEngine
from pdserve.common.engine.llama import RowsLinear


@pytest.fixture(scope="module")
def fused(tiny_model_dir):
    ref = model_loader.resolve(str(tiny_model_dir))
    model, tok = model_loader.load(ref, dtype="float32")
    engine = LLMEngine(EngineConfig(dtype="float32", num_kv_blocks=16), model, tok, ref)
    if engine.runner.fused is None or not engine.runner.fused.decode_by_rows:
        pytest.skip(f"float32 runs {engine.runner.describe()} here, not the row kernel")
    return engine, model


def _huge_kb(address: int) -> int:
    """AnonHugePages of the mapping that holds `address`, from /proc/self/smaps."""
    lines, inside = Path("/proc/self/smaps").read_text().splitlines(), False
    for line in lines:
        head = line.split()[0]
        if "-" in head and all(c in "0123456789abcdef-" for c in head):
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= address < hi
        elif inside and line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    raise AssertionError(f"no mapping holds {address:#x}")


def test_the_step_s_weights_sit_back_to_back_in_the_order_it_reads_them(fused):
    engine, _ = fused
    f = engine.runner.fused
    weights = [*f.decode_weights, f.lm_head.weight]
    assert isinstance(f.lm_head, RowsLinear)
    for a, b in zip(weights, weights[1:]):
        assert b.data_ptr() == a.data_ptr() + a.numel() * a.element_size()


def test_a_tied_head_reads_the_embedding_in_place(fused):
    engine, model = fused
    assert engine.runner.fused.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_the_weights_are_in_huge_pages_where_the_kernel_gives_them(fused):
    mode = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    if "[never]" in mode:
        pytest.skip("transparent huge pages are off on this host")
    engine, _ = fused
    f = engine.runner.fused
    nbytes = sum(w.numel() * w.element_size() for w in [*f.decode_weights, f.lm_head.weight])
    if nbytes < 4 << 20:  # a 2 MiB page needs an aligned 2 MiB inside the mapping
        pytest.skip(f"{nbytes} bytes of weights: too few for a whole huge page")
    assert _huge_kb(f.decode_weights[0].data_ptr()) > 0
