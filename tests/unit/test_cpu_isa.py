"""`--as-cpu avx2`: every system of a benchmark on an AVX2-only CPU's code paths (bench/cpu_isa.py)."""

from __future__ import annotations

import os
import subprocess
import sys

from pdserve.bench import cpu_isa, peers


def test_native_changes_nothing():
    assert cpu_isa.environment("native") == {} and cpu_isa.probe_shim("native") == {}


def test_avx2_holds_torch_onednn_mkl_and_pdserve_s_kernels_to_avx2():
    env = cpu_isa.environment("avx2")
    assert env["ATEN_CPU_CAPABILITY"] == "avx2" and env["ONEDNN_MAX_CPU_ISA"] == "AVX2"
    assert env["MKL_ENABLE_INSTRUCTIONS"] == "AVX2" and env["PDSERVE_KERNEL_MARCH"] == "x86-64-v3"


def test_the_probe_shim_makes_torch_cpu_answer_as_an_avx2_only_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("PDSERVE_CACHE_DIR", str(tmp_path))
    shim = cpu_isa.probe_shim("avx2")
    code = "import torch.cpu as c; print(c._is_avx512_supported(), c._is_amx_tile_supported(), c._is_avx2_supported())"
    out = subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, **shim}, capture_output=True, text=True, check=True
    ).stdout.split()
    assert out[:2] == ["False", "False"]  # vLLM's kernel choice reads these
    assert out[2] == str(bool(__import__("torch").cpu._is_avx2_supported()))  # AVX2 itself is left as it is


def test_vllm_gets_the_shim_on_its_pythonpath():
    launch = peers.Launch(54100, "/m", "/m", "/py", probe_env={"PYTHONPATH": "/shim"})
    assert peers.PEERS["vllm"].env(launch)["PYTHONPATH"] == "/shim"
