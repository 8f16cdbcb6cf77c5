"""The synthetic Mooncake-format trace that `python -m pdserve.bench.mooncake`
writes, and what `pdserve bench load` says about a trace file it cannot use."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pdserve.bench import mooncake, workload


def run(*argv: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True, timeout=120, cwd=cwd)


def test_the_written_sample_reads_back_as_the_same_trace_for_the_same_seed(tmp_path):
    done = run("pdserve.bench.mooncake", "--num-requests", "50", "--out", str(tmp_path / "t.jsonl"))
    assert done.returncode == 0, done.stderr
    assert mooncake.read_trace(tmp_path / "t.jsonl") == mooncake.synthesize(50)
    assert mooncake.synthesize(50, seed=1) != mooncake.synthesize(50)


def test_the_sample_is_conversations_that_resend_their_history():
    records = mooncake.synthesize(300, rate=2.0)
    assert [r.timestamp_ms for r in records] == sorted(r.timestamp_ms for r in records)
    for r in records:  # one hash id per 512-token block, the last one partly filled
        assert (len(r.hash_ids) - 1) * 512 < r.input_length <= len(r.hash_ids) * 512
        assert len(r.hash_ids) <= mooncake.MAX_BLOCKS and 16 <= r.output_length <= 256
    # A later turn's ids start with an earlier turn's whole history, and so do its prompt's tokens.
    extends = [
        (i, j)
        for j, b in enumerate(records)
        for i, a in enumerate(records[:j])
        if b.hash_ids[: len(a.hash_ids)] == a.hash_ids
    ]
    assert len({j for _, j in extends}) > len(records) / 2
    prompts = {q.index: q.prompt for q in workload.from_trace(records)}
    i, j = extends[0]
    full = (len(records[i].hash_ids) - 1) * 512  # the earlier turn's full blocks
    assert prompts[j][:full] == prompts[i][:full]


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "trace {path}: No such file or directory (python -m pdserve.bench.mooncake --out FILE writes a sample)"),
        ('{"timestamp": 1}\n', "{path}:1: not a Mooncake trace record ('input_length')"),
    ],
)
def test_an_unusable_trace_is_one_line_and_exit_2(tmp_path, content, message):
    path = tmp_path / "mooncake_trace.jsonl"
    if content is not None:
        path.write_text(content)
    done = run("pdserve", "bench", "load", "--trace", str(path), "--target", "127.0.0.1:1")
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.splitlines() == [f"pdserve bench load: {message.format(path=path)}"]
