"""The kernels as other CPUs build them, whatever CPU runs the suite.

A host runs only its own build's paths: an AVX-512 or AMX host never runs the 8-lane paths (the small
ops, the float32 row kernel, the decode attention span), and an AMX host never runs the bf16 products
on AVX512_BF16 vectors (the panels and prefill attention of Zen 4 and 5 and Cooper Lake). Here the
kernel tests run again in a fresh interpreter under another build's variables.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pdserve.bench import cpu_isa
from pdserve.common.engine import kernels
from tests.cpu import cpu_flags

ROOT = Path(__file__).resolve().parents[2]
KERNEL_TESTS = ("tests/engine/test_cpu_kernels.py", "tests/engine/test_layer_ops.py")
PROBE = (
    "from pdserve.common.engine import kernels; "
    "print(kernels.vectorized(), kernels.linear_tiles(), kernels.amx(), kernels.library_path().name)"
)
# Cooper Lake's ISA: AVX-512 with AVX512_BF16 and no AMX; oneDNN, the tests' reference, held to it too.
VECTOR_BF16_ENV = {"PDSERVE_KERNEL_MARCH": "cooperlake", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}


def _run_kernel_tests(env: dict[str, str]) -> tuple[str, ...]:
    """The probe's answers under env (a build of its own), after the kernel tests passed there."""
    env = {**os.environ, **env}
    built = subprocess.run([sys.executable, "-c", PROBE], env=env, cwd=ROOT, capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-2000:]
    *answers, name = built.stdout.split()
    assert name != kernels.library_path().name  # a build of its own, not this process's one
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *KERNEL_TESTS],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stdout[-4000:]
    assert " passed" in run.stdout.splitlines()[-1]
    return tuple(answers)


needs_compiler = pytest.mark.skipif(
    shutil.which(os.environ.get("CXX", "g++")) is None, reason="no C++ compiler to build the kernels"
)


@needs_compiler
@pytest.mark.skipif(not {"avx2", "fma"} <= cpu_flags(), reason="x86-64-v3 code needs AVX2 and FMA to run")
@pytest.mark.skipif(
    "avx512f" not in cpu_flags() and kernels.vectorized(),
    reason="this host's own build already runs the 8-lane paths (an AVX2 CPU)",
)
def test_the_kernel_tests_pass_against_the_avx2_build():
    vectorized, panels, amx = _run_kernel_tests(cpu_isa.environment("avx2"))
    assert (vectorized, panels, amx) == ("True", "False", "False")  # the 8-lane paths, oneDNN's matmuls


@needs_compiler
@pytest.mark.skipif(not kernels.amx(), reason="this host's own build already runs the products on vectors, or can't")
def test_the_kernel_tests_pass_against_the_avx512_bf16_build_without_amx():
    vectorized, panels, amx = _run_kernel_tests(VECTOR_BF16_ENV)
    assert (vectorized, panels, amx) == ("True", "True", "False")  # the panels on AVX512_BF16 vectors
