"""The kernels as an AVX2-only CPU builds them, whatever CPU runs the suite.

An AVX-512 or AMX host never runs the 8-lane paths (the small ops, the float32 row kernel, the decode
attention span) otherwise: here the kernel tests run again in a fresh interpreter under the
variables of `--as-cpu avx2` (services/bench/cpu_isa.py), which build the kernels for x86-64-v3.
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

ROOT = Path(__file__).resolve().parents[2]
KERNEL_TESTS = ("tests/engine/test_cpu_kernels.py", "tests/engine/test_layer_ops.py")


def _has_avx2_and_fma() -> bool:
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return False
    return "avx2" in flags and "fma" in flags


@pytest.mark.skipif(not _has_avx2_and_fma(), reason="x86-64-v3 code needs AVX2 and FMA to run")
@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None, reason="no C++ compiler to build the kernels")
def test_the_kernel_tests_pass_against_the_avx2_build():
    env = {**os.environ, **cpu_isa.environment("avx2")}
    probe = "from pdserve.common.engine import kernels; print(kernels.vectorized(), kernels.library_path().name)"
    built = subprocess.run([sys.executable, "-c", probe], env=env, cwd=ROOT, capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-2000:]
    vectorized, name = built.stdout.split()
    assert vectorized == "True"  # the 8-lane paths are on in that build
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
