"""`pdserve profile` on the tiny random model: real steps of known shapes, a fitted step model, a keyed cache."""

from __future__ import annotations

import dataclasses
import re

import pytest

from pdserve.cli import main
from pdserve.common import model_loader
from pdserve.common.engine.config import EngineConfig
from pdserve.common.engine.engine import LLMEngine
from pdserve.planner import measure, step_timing
from pdserve.planner.profile import Profile, ProfileMismatchError, StepShape, fit, model_key

FIT_ERROR_BOUND = 0.5  # mean relative error on its own samples: 4-9% seen; tiny steps (1-15 ms) are noisy


@pytest.fixture(scope="module")
def measured(tiny_model_dir):
    return measure.measure(str(tiny_model_dir), threads=(1,), quick=True)


def test_a_profile_is_keyed_by_the_model_dtype_and_this_hardware(measured, tiny_model_dir):
    profile, _ = measured
    assert profile.model == model_key(model_loader.resolve(str(tiny_model_dir)))
    assert profile.hardware == measure.hardware_key("cpu") and profile.hardware.startswith("cpu: ")
    assert profile.dtype in ("float32", "bfloat16") and profile.block_size > 0 and profile.measured_at
    assert set(profile.steps) == {1}
    assert profile.transfer_ms_per_block > 0 and profile.transfer_base_ms > 0 and profile.router_hop_ms > 0
    assert "memcpy" in profile.notes["transfer"]


def test_the_steps_timed_are_prompt_chunks_decode_batches_and_both_at_once(measured):
    _, samples = measured
    shapes = [shape for shape, _ in samples[1]]
    assert StepShape.chunk(32, 0) in shapes
    assert StepShape.chunk(512, 0) in shapes and StepShape.chunk(512, 512) in shapes  # a second chunk
    decodes = [s for s in shapes if s.decode_seqs and not s.prefill_tokens]
    assert {s.decode_seqs for s in decodes} == {1, 4, 8, 16, 32}
    per_seq = [s.decode_context / s.decode_seqs for s in decodes]
    assert min(per_seq) < 100 and max(per_seq) > 1500  # ~64 to ~2,048 tokens (this model's window: 2,048)
    assert max(s.decode_context for s in decodes) > 32 * 512  # 32 sequences at 512, quick too
    assert any(s.decode_seqs and s.prefill_tokens for s in shapes)  # decodes beside a prompt chunk
    assert all(ms > 0 for _, ms in samples[1])


def test_a_decode_sample_is_set_up_without_computing_its_prompts_and_then_timed_in_full(tiny_model_dir):
    ref = model_loader.resolve(str(tiny_model_dir))
    model, tok = model_loader.load(ref, dtype="float32")
    engine = LLMEngine(EngineConfig(dtype="float32", num_kv_blocks=64, enable_prefix_caching=False), model, tok, ref)
    run = step_timing._Stepper(engine)
    try:
        (rid,) = run.decoding(1, 100, max_tokens=4)
        (seq,) = engine.scheduler.running
        assert seq.request_id == rid and seq.num_computed_tokens == 99 and seq.output_token_ids == [0]
        kv = engine.pool.tensor
        assert not kv.any()  # set up: blocks allocated, nothing computed into them
        shape, ms = run.step()
        assert shape == StepShape(decode_seqs=1, decode_context=100) and ms > 0
        assert kv.any()  # the timed step ran the model: its token's KV was written
    finally:
        run.close()


def test_predicted_steps_are_positive_grow_with_work_and_fit_what_was_measured(measured):
    profile, samples = measured
    m = profile.step_model(1)
    one = m.ms(StepShape(decode_seqs=1, decode_context=64))
    assert one > 0
    assert m.ms(StepShape(decode_seqs=16, decode_context=16 * 64)) >= one
    assert m.ms(StepShape(decode_seqs=1, decode_context=512)) >= one
    assert m.ms(StepShape.chunk(512, 0)) > m.ms(StepShape.chunk(32, 0))
    assert m.ms(StepShape.chunk(512, 512)) >= m.ms(StepShape.chunk(512, 0))
    mean, worst = measure.fit_error(profile, samples)[1]
    assert mean < FIT_ERROR_BOUND, (mean, worst, samples)


def test_steps_timed_beside_other_work_are_timed_again_and_the_best_fit_kept(measured, monkeypatch):
    _, samples = measured
    quiet = samples[1]
    # One step in three slowed 5x, as by another process on the cores: no line fits that.
    disturbed = [(shape, ms * 5 if i % 3 == 0 else ms) for i, (shape, ms) in enumerate(quiet)]
    timed = iter([disturbed, quiet])
    monkeypatch.setattr(measure, "step_samples", lambda engine, quick: next(timed))
    model, kept = measure._fitted(engine=None, quick=True)
    assert kept == quiet and model == fit(quiet)
    assert next(timed, None) is None  # timed twice: the second fit was good enough to stop


def test_a_profile_round_trips_through_its_file(measured, tmp_path):
    profile, _ = measured
    profile.save(tmp_path / "p.json")
    assert Profile.load(tmp_path / "p.json") == profile


def test_a_profile_of_another_model_dtype_or_device_is_refused_naming_both(measured):
    profile, _ = measured
    with pytest.raises(ProfileMismatchError, match=re.escape(f"model {profile.model!r}, not 'other@0123'")):
        profile.require("other@0123", profile.dtype, profile.hardware)
    with pytest.raises(ProfileMismatchError, match=r"dtype .*, not 'float16'"):
        profile.require(profile.model, "float16", profile.hardware)
    with pytest.raises(ProfileMismatchError, match=re.escape(f"hardware {profile.hardware!r}, not 'cuda: X'")):
        profile.require(profile.model, profile.dtype, "cuda: X")


def test_load_or_measure_measures_once_then_reads_the_cache(measured, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("PDSERVE_PROFILE_DIR", str(tmp_path))
    calls = []

    def counted(*args, **kw):
        calls.append(args)
        return measured

    monkeypatch.setattr(measure, "measure", counted)
    said = []
    first = measure.load_or_measure(str(tiny_model_dir), say=said.append)
    path = measure.cache_path(first.model, first.dtype, first.hardware)
    assert path.parent == tmp_path and path.exists() and len(calls) == 1 and "once" in said[0]
    mtime = path.stat().st_mtime_ns
    assert measure.load_or_measure(str(tiny_model_dir), say=said.append) == first
    assert len(calls) == 1 and path.stat().st_mtime_ns == mtime and len(said) == 1

    path.write_text("{ half a profile")  # unreadable: measured again and replaced
    assert measure.load_or_measure(str(tiny_model_dir), say=said.append) == first
    assert len(calls) == 2 and "unusable" in said[-1] and Profile.load(path) == first


def test_pdserve_profile_prints_each_thread_counts_model_and_fit_error(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "p.json"
    assert main(["profile", "--model", str(tiny_model_dir), "--threads", "1", "--quick", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "fit error" in text and f"saved to {out}" in text
    assert Profile.load(out).steps.keys() == {1}


def test_pdserve_plan_refuses_a_given_profile_of_another_model_than_model_naming_both(
    measured, tiny_model_dir, tmp_path, capsys
):
    profile, _ = measured
    path = tmp_path / "p.json"
    dataclasses.replace(profile, model="other@0123").save(path)
    assert main(["plan", "--profile", str(path), "--model", str(tiny_model_dir), "--cores", "2"]) == 2
    err = capsys.readouterr().err
    assert "'other@0123'" in err and repr(profile.model) in err


def test_a_smaller_chunk_sets_up_every_decode_batch_and_one_no_larger_than_the_largest_is_refused(tiny_model_dir):
    _, samples = measure.measure(str(tiny_model_dir), threads=(1,), quick=True, chunk=128)
    assert 32 in {s.decode_seqs for s, _ in samples[1]}  # its decodes share 128-token steps while set up
    with pytest.raises(ValueError, match="chunk must be over 32 tokens"):
        measure.measure(str(tiny_model_dir), threads=(1,), quick=True, chunk=32)
