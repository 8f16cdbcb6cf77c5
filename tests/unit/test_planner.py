"""The simulator steps workers as the engine's scheduler does, and the planner ranks topologies by capacity."""

from __future__ import annotations

import argparse
import importlib.util
from dataclasses import astuple

import pytest

from pdserve.bench.workload import Mixed, Request
from pdserve.cli import main
from pdserve.planner.planner import NoTopologyError, Objectives, candidates, plan, reason, sim_requests
from pdserve.planner.profile import Profile, StepModel, StepShape, fit
from pdserve.planner.simulator import Topology, simulate

FLAT = StepModel(base_ms=10.0, per_seq_ms=0.1, per_context_ms=0.0, per_prompt_token_ms=0.1, per_pair_ms=0.0)


def profile(models: dict[int, StepModel] | None = None, hop_ms: float = 1.0) -> Profile:
    return Profile(
        "fp",
        "float32",
        "cpu: test",
        16,
        models or {1: FLAT, 2: FLAT},
        transfer_ms_per_block=0.5,
        transfer_base_ms=2.0,
        router_hop_ms=hop_ms,
    )


def req(i: int, at: float, prompt: int, out: int) -> Request:
    return Request(i, at, [100] * prompt, out)


def test_a_lone_colocated_request_takes_a_prefill_step_then_one_step_per_token():
    (o,) = simulate(Topology("colocated", 0, 1, 2, chunk=512), profile(), [req(0, 0.0, 100, 5)])
    assert o.ttft_ms == pytest.approx(1.0 + 10.0 + 0.1 * 100)  # hop, then one step over 100 prompt tokens
    assert o.tpot_ms == pytest.approx(10.0 + 0.1 * 1)  # each later step decodes one token
    assert o.path == "colocated" and o.output_tokens == 5


def test_a_prompt_longer_than_the_chunk_takes_a_step_per_chunk_before_its_first_token():
    (o,) = simulate(Topology("colocated", 0, 1, 2, chunk=64), profile(), [req(0, 0.0, 200, 2)])
    chunks = [64, 64, 64, 8]
    assert o.ttft_ms == pytest.approx(1.0 + sum(10.0 + 0.1 * c for c in chunks))


def test_streams_share_steps_and_a_long_prefill_stalls_a_colocated_stream_but_not_a_disaggregated_one():
    quadratic = StepModel(5.0, 0.05, 0.0, 0.05, 0.001)  # long prompts cost more per token
    work = [req(0, 0.0, 32, 40), req(1, 0.2, 1500, 2)]
    colocated = simulate(Topology("colocated", 0, 1, 1, chunk=2048), profile({1: quadratic}), work)
    split = simulate(Topology("disaggregated", 1, 1, 1, chunk=2048), profile({1: quadratic}, hop_ms=0.0), work)
    assert colocated[0].tpot_ms > 2 * split[0].tpot_ms
    assert split[1].path == "remote"  # the decode worker is busy: the long prompt goes to the prefill worker


def test_a_remote_prefill_moves_its_kv_before_decode_continues():
    # The decode worker is busy with a stream, so a 600-token prompt is prefilled remotely;
    # its 38 blocks take 2 + 38 * 0.5 ms to move before decode can take its second token.
    work = [req(0, 0.0, 32, 30), req(1, 0.05, 600, 2)]
    busy, moved = simulate(Topology("disaggregated", 1, 1, 1), profile(hop_ms=0.0), work)
    assert moved.path == "remote" and busy.path == "local"
    assert (moved.last_s - moved.first_s) * 1e3 >= 2.0 + 38 * 0.5 + 10.0


def test_two_cores_allow_one_or_two_colocated_workers_or_one_pair_and_devices_one_each():
    shapes = {(t.mode, t.prefill, t.decode, t.threads) for t in candidates(2, chunks=(512,))}
    assert shapes == {("colocated", 0, 1, 2), ("colocated", 0, 2, 1), ("disaggregated", 1, 1, 1)}
    on_gpus = candidates(0, devices=4, chunks=(512,))
    assert all(t.threads == 1 for t in on_gpus) and ("disaggregated", 3, 1) in {
        (t.mode, t.prefill, t.decode) for t in on_gpus
    }


def test_halving_the_threads_per_phase_loses_where_steps_scale_with_cores():
    two_threads_twice_as_fast = {
        1: StepModel(40.0, 0.2, 0.002, 1.2, 0.00002),
        2: StepModel(20.0, 0.1, 0.001, 0.6, 0.00001),
    }
    scores = plan(
        profile(two_threads_twice_as_fast),
        lambda r: Mixed().requests(80, r, seed=3),
        Objectives(),
        cores=2,
        chunks=(512,),
    )
    assert scores[0].topology.mode == "colocated" and scores[0].capacity_rps > 0
    assert "the best disaggregated" in reason(scores)


@pytest.mark.parametrize("rate", [0.05, 1.0, 7.0, 40.0])
def test_every_rate_is_simulated_long_enough_to_reach_a_steady_state(rate):
    # A short run at a high rate ends before its queues and batches grow, and overstates what it sustains.
    n = sim_requests(rate)
    assert n >= 150 and n / rate >= 90


def test_objectives_no_topology_meets_are_refused_naming_the_closest():
    with pytest.raises(NoTopologyError, match=r"no topology meets TTFT <= 1 ms .* the closest: ") as refused:
        plan(profile(), lambda r: Mixed().requests(20, r, seed=3), Objectives(ttft_ms=1.0), cores=2, chunks=(512,))
    assert str(refused.value.closest.topology) in str(refused.value)


def test_up_in_auto_mode_starts_the_closest_topology_where_none_meets_the_objectives(monkeypatch):
    from pdserve.launcher import auto
    from pdserve.planner import measure

    monkeypatch.setattr(measure, "load_or_measure", lambda *a, **kw: profile())
    args = argparse.Namespace(
        model=None, device=None, dtype=None, plan_workload="mixed", slo_ttft_ms=1.0, slo_tpot_ms=150.0, attainment=0.9
    )
    said = []
    chosen = auto.choose(args, say=said.append)
    assert chosen.prefill + chosen.decode >= 1 and chosen.threads >= 1
    assert said == [chosen.why] and "starts the closest, as no topology meets TTFT <= 1 ms" in chosen.why


def test_the_fit_recovers_the_costs_of_measured_steps_and_never_makes_one_negative():
    true = StepModel(25.0, 0.2, 0.001, 0.7, 0.0007)
    shapes = [StepShape.chunk(n, b) for n, b in ((32, 0), (256, 0), (512, 0), (512, 512))]
    shapes += [StepShape(decode_seqs=b, decode_context=b * c) for b, c in ((1, 64), (4, 256), (16, 128), (16, 512))]
    assert astuple(fit([(s, true.ms(s)) for s in shapes])) == pytest.approx(astuple(true), rel=1e-6)
    decreasing = [(StepShape(decode_seqs=b, decode_context=b * 64), 30.0 - b * 0.1) for b in (1, 2, 4, 8, 16, 32)]
    fitted = fit(decreasing)  # a step cannot get cheaper with more work: the cost is clamped to 0
    assert fitted.per_seq_ms == 0.0 and fitted.per_context_ms == 0.0 and fitted.base_ms > 0


def test_the_fit_holds_a_decode_step_to_its_share_beside_prompt_steps_fifty_times_longer():
    true = StepModel(15.0, 2.5, 0.0025, 2.2, 0.0006)
    prompts = [StepShape.chunk(n, b) for n, b in ((32, 0), (128, 0), (512, 0), (512, 512))]
    decodes = [
        StepShape(decode_seqs=b, decode_context=b * c) for b, c in ((1, 64), (4, 64), (16, 64), (1, 512), (32, 512))
    ]
    # the prompt steps timed 4% off, over and under in turn, as a busy host times a second-long step; in
    # absolute ms those few ms outweighed the decode steps, whose fit was then 30% off
    timed = [(s, true.ms(s) * (1.04 if i % 2 else 0.96)) for i, s in enumerate(prompts)]
    model = fit(timed + [(s, true.ms(s)) for s in decodes])
    assert max(abs(model.ms(s) / true.ms(s) - 1) for s in decodes) < 0.02


def test_shapes_add_and_a_chunk_counts_its_attention_pairs():
    assert StepShape.chunk(4, 10).prefill_pairs == 4 * 12
    both = StepShape(decode_seqs=2, decode_context=300) + StepShape.chunk(8, 0)
    assert (both.decode_seqs, both.decode_context, both.prefill_tokens) == (2, 300, 8)


def test_plan_refuses_a_malformed_trace_naming_its_line(tmp_path, capsys):
    trace = tmp_path / "trace.jsonl"
    trace.write_text('{"timestamp": 0, "input_length": 10, "output_length": 5, "hash_ids": [1]}\nnot json\n')
    prof = tmp_path / "profile.json"
    profile().save(prof)
    assert main(["plan", "--profile", str(prof), "--trace", str(trace)]) == 2
    assert "trace.jsonl:2: not a Mooncake trace record" in capsys.readouterr().err


def test_plan_prints_a_ranked_table_and_its_recommendation(tmp_path, capsys):
    prof = tmp_path / "profile.json"
    profile().save(prof)
    assert main(["plan", "--profile", str(prof), "--cores", "2", "--chunks", "512", "--num-requests", "40"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[1].startswith("topology") and "recommended: " in out


def test_plan_refuses_a_plot_it_cannot_draw_before_planning(tmp_path, capsys, monkeypatch):
    prof = tmp_path / "profile.json"
    profile().save(prof)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    assert main(["plan", "--profile", str(prof), "--plot", str(tmp_path / "plan.png")]) == 2
    captured = capsys.readouterr()
    assert "--plot needs matplotlib" in captured.err and captured.out == ""  # nothing planned, then lost
