"""Where a fused float32 model keeps its row-kernel weights (or float32 panels): one mapping, in the
order a decode step reads them, a tied head and the embedding one copy; on 4 KB pages at start (fast
to fault in) and in huge pages once the worker is warm (faster to read). docs/engine.md, "Weights in
huge pages"."""

from __future__ import annotations

import pytest

from pdserve.common import model_loader
from pdserve.common.engine.async_engine import AsyncEngine
from pdserve.common.engine.config import EngineConfig
from pdserve.common.engine.engine import LLMEngine
from pdserve.common.engine.llama import FloatPanelLinear, RowsLinear
from pdserve.common.engine.sampling_params import SamplingParams
from pdserve.common.kv import host_memory
from tests.polling import eventually
from tests.smaps import mapped_bytes, needs_thp


def _fused_float32(model_dir, **kw):
    ref = model_loader.resolve(str(model_dir))
    model, tok = model_loader.load(ref, dtype="float32")
    engine = LLMEngine(EngineConfig(dtype="float32", num_kv_blocks=16, **kw), model, tok, ref)
    fused = engine.runner.fused
    if fused is None or fused.arena is None or fused.decode_weights is None:
        pytest.skip(f"float32 runs {engine.runner.describe()} here, not the row kernel or float32 panels")
    return engine, model


@pytest.fixture(scope="module")
def fused(tiny_model_dir):
    return _fused_float32(tiny_model_dir)


def test_the_step_s_weights_sit_back_to_back_in_the_order_it_reads_them(fused):
    engine, _ = fused
    f = engine.runner.fused
    weights = [*f.decode_weights, f.lm_head.weight]
    assert isinstance(f.lm_head, (RowsLinear, FloatPanelLinear))
    assert f.arena.data_ptr() == weights[0].data_ptr()
    for a, b in zip(weights, weights[1:]):
        assert b.data_ptr() == a.data_ptr() + a.numel() * a.element_size()


def test_a_tied_head_and_the_embedding_share_one_copy(fused):
    engine, model = fused
    head = engine.runner.fused.lm_head
    if isinstance(head, FloatPanelLinear):  # the embedding is read from the head's panels
        assert model.model.embed_tokens.weight.numel() == 0 and engine.runner.fused.embed == head.rows
    else:  # the head reads the embedding in place
        assert head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


@needs_thp
def test_warming_up_moves_the_weights_from_small_pages_into_huge_ones(tiny_model_dir):
    engine, _ = _fused_float32(tiny_model_dir)
    arena = engine.runner.fused.arena
    assert arena.nbytes >= 4 * host_memory.HUGE_PAGE  # the tiny model's tied head is 12.6 MB
    assert mapped_bytes(arena) == 0  # built on 4 KB pages: no compaction on the start path
    before = engine.generate([[5, 6, 7]], SamplingParams(max_tokens=4))

    async_engine = AsyncEngine(engine)
    async_engine.warm_up(tokens=64, rounds=1)  # then collapses, on a thread of its own
    whole_pages = arena.nbytes // host_memory.HUGE_PAGE * host_memory.HUGE_PAGE  # it starts on a boundary
    huge = lambda: mapped_bytes(arena) == whole_pages  # noqa: E731
    if not eventually(huge, 30, interval=0.1):
        why = host_memory.collapse(arena)
        if "EINVAL" in why:
            pytest.skip(f"this kernel can't collapse pages ({why}): Linux 6.1+ can")
        pytest.fail(f"{mapped_bytes(arena)} of {arena.nbytes} bytes in huge pages; collapse: {why!r}")
    assert engine.generate([[5, 6, 7]], SamplingParams(max_tokens=4)) == before  # the same weights, moved
