"""The load generator's workloads: Mooncake traces, shared prefix blocks, arrivals, lengths."""

from __future__ import annotations

import argparse
import json
import random
import statistics

import pytest

from pdserve.bench import mooncake, workload
from pdserve.bench.metrics import RequestRecord, Slo, summarize
from pdserve.bench.workload import LengthDist

TRACE = [  # the public Mooncake trace's shape: ms timestamps, lengths, one hash id per 512-token block
    {"timestamp": 1000, "input_length": 1200, "output_length": 10, "hash_ids": [7, 8, 9]},
    {"timestamp": 1500, "input_length": 700, "output_length": 3, "hash_ids": [7, 11]},
    {"timestamp": 4000, "input_length": 512, "output_length": 5, "hash_ids": [20]},
]


@pytest.fixture
def trace_file(tmp_path):
    path = tmp_path / "trace.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in TRACE) + "\n\n")
    return path


def test_mooncake_records_are_read_with_their_fields(trace_file):
    records = mooncake.read_trace(trace_file)
    assert records[1] == mooncake.TraceRecord(1500.0, 700, 3, (7, 11))
    assert len(records) == 3


def test_a_malformed_trace_line_is_reported_with_its_number(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(TRACE[0]) + "\n" + json.dumps({"timestamp": 1}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        mooncake.read_trace(path)


def test_equal_hash_ids_give_equal_token_blocks_and_different_ids_differ(trace_file):
    requests = workload.from_trace(mooncake.read_trace(trace_file))
    first, second, third = (r.prompt for r in requests)
    assert [len(p) for p in (first, second, third)] == [1200, 700, 512]
    assert first[:512] == second[:512]  # hash id 7 is shared: the same first block
    assert first[512:700] != second[512:700]  # 8 and 11 are different blocks
    assert third[:16] != first[:16]
    assert all(workload.TOKEN_LOW <= t < workload.TOKEN_HIGH for t in first)


def test_prefix_blocks_are_the_same_in_every_run_and_depend_on_the_salt():
    assert mooncake.PrefixBlocks(16).block(42) == mooncake.PrefixBlocks(16).block(42)
    assert mooncake.PrefixBlocks(16, salt=1).block(42) != mooncake.PrefixBlocks(16).block(42)


def test_trace_arrivals_follow_its_timestamps_scaled_by_speed(trace_file):
    records = mooncake.read_trace(trace_file)
    assert [r.arrival_s for r in workload.from_trace(records)] == [0.0, 0.5, 3.0]
    assert [r.arrival_s for r in workload.from_trace(records, speed=2.0)] == [0.0, 0.25, 1.5]
    assert [r.max_tokens for r in workload.from_trace(records)] == [10, 3, 5]


def test_trace_prompts_and_outputs_are_cut_to_the_given_limits(trace_file):
    requests = workload.from_trace(mooncake.read_trace(trace_file), max_prompt=600, max_output=4)
    assert [len(r.prompt) for r in requests] == [600, 600, 512]
    assert [r.max_tokens for r in requests] == [4, 3, 4]


def test_poisson_inter_arrival_times_average_one_over_the_rate():
    times = workload.poisson_arrivals(20.0, 5000, random.Random(1))
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert times[0] == 0.0
    assert statistics.mean(gaps) == pytest.approx(1 / 20.0, rel=0.05)
    assert statistics.stdev(gaps) == pytest.approx(1 / 20.0, rel=0.1)  # exponential: stdev = mean


def test_an_infinite_rate_sends_everything_at_once():
    assert workload.poisson_arrivals(float("inf"), 4, random.Random(0)) == [0.0] * 4


@pytest.mark.parametrize(
    "spec, low, high", [("fixed:7", 7, 7), ("9", 9, 9), ("uniform:3:5", 3, 5), ("lognormal:100:0.5:150", 1, 150)]
)
def test_length_distributions_stay_in_their_range(spec, low, high):
    dist = LengthDist.parse(spec)
    rng = random.Random(0)
    assert all(low <= dist.sample(rng) <= high for _ in range(500))


@pytest.mark.parametrize("spec", ["uniform:5:3", "fixed:0", "lognormal:10", "zipf:3", "x"])
def test_bad_length_distributions_are_rejected(spec):
    with pytest.raises(ValueError):
        LengthDist.parse(spec)


def test_synthetic_prompts_share_no_prefix_block():
    requests = workload.synthetic(50, 5.0, LengthDist.parse("fixed:16"), LengthDist.parse("fixed:4"), seed=3)
    assert len({tuple(r.prompt) for r in requests}) == 50
    assert all(len(r.prompt) == 16 and r.max_tokens == 4 for r in requests)


def test_mixed_preset_has_long_prompts_among_short_ones():
    requests = workload.Mixed(long_fraction=0.25).requests(400, 2.0, seed=0)
    long = [r for r in requests if r.kind == "long"]
    assert 60 < len(long) < 140
    assert min(len(r.prompt) for r in long) >= 1000 > max(len(r.prompt) for r in requests if r.kind == "short")


def test_the_same_arguments_give_the_same_workload_and_another_seed_another():
    parser = argparse.ArgumentParser()
    workload.add_args(parser)
    args = parser.parse_args(["--workload", "mixed", "--num-requests", "5", "--rate", "2"])
    a, b = workload.from_args(args), workload.from_args(args)
    assert [r.prompt for r in a] == [r.prompt for r in b]
    assert [r.prompt for r in workload.from_args(args, seed=1)] != [r.prompt for r in a]
    assert len(workload.from_args(args, n=3)) == 3


def _record(ttft_s: float, gap_s: float, tokens: int, prompt: int = 10) -> RequestRecord:
    r = RequestRecord(0, prompt, tokens, scheduled_s=0.0, sent_s=0.0)
    for i in range(tokens):
        r.tokens(ttft_s + i * gap_s, 1)
    r.done_s = r.token_times[-1]
    return r


def test_goodput_counts_requests_within_both_objectives():
    fast, slow_start, slow_decode = _record(0.1, 0.02, 5), _record(0.5, 0.02, 5), _record(0.1, 0.2, 5)
    s = summarize([fast, slow_start, slow_decode], Slo(ttft_ms=200, tpot_ms=50))
    assert s["slo_attainment"] == pytest.approx(1 / 3)
    assert s["goodput_rps"] < s["throughput_rps"]
    assert s["tpot_ms"]["p50"] == pytest.approx(20)
    assert s["itl_ms"]["max"] == pytest.approx(200)


def test_a_stall_in_fewer_than_1_percent_of_gaps_shows_in_the_p99_9_not_the_p99():
    # 10 streams of 101 tokens at 20 ms; two of them wait 3 s once (2 gaps in 1,000).
    records = [_record(0.1, 0.02, 101) for _ in range(10)]
    for stalled in records[:2]:
        stalled.token_times[50:] = [t + 3.0 for t in stalled.token_times[50:]]
    s = summarize(records, Slo(ttft_ms=200, tpot_ms=50))
    assert s["itl_ms"]["p99"] == pytest.approx(20)
    assert s["itl_ms"]["p99.9"] == pytest.approx(3020) and s["itl_ms"]["max"] == pytest.approx(3020)


def test_the_ttft_objective_can_grow_with_the_prompt():
    slo = Slo(ttft_ms=100, tpot_ms=50, ttft_ms_per_token=1.0)
    assert slo.met(_record(0.5, 0.01, 3, prompt=450)) and not slo.met(_record(0.5, 0.01, 3, prompt=350))


def test_objectives_scale_the_idle_ttft_line_and_idle_tpot():
    from pdserve.bench import report

    idle = [_record(0.05 + 0.001 * n, 0.03, 5, prompt=n) for n in (50, 500, 1000, 2000)]  # 50 ms + 1 ms/token
    objectives = report.objectives({"colocated": {"idle": idle, "runs": {}}}, "colocated", 3.0, 2.0)
    slo = objectives["slo"]
    assert slo.ttft_ms == pytest.approx(150, abs=1) and slo.ttft_ms_per_token == pytest.approx(3.0, rel=0.01)
    assert slo.tpot_ms == pytest.approx(60)
    assert objectives["derived_from"] == "colocated"


def test_idle_prompts_of_one_length_give_a_flat_ttft_objective():
    from pdserve.bench import report

    assert report.idle_line([_record(t, 0.03, 3, prompt=64) for t in (0.1, 0.2, 0.3)]) == (pytest.approx(200), 0.0)
