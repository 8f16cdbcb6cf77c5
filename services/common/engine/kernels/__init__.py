"""pdserve's own CPU kernels: C++ sources built once per machine with g++, loaded as torch ops.

The build is cached under the pdserve cache directory, keyed by the source, the
torch version and this CPU's flags (it is built with -march=native), so a shared
home directory never loads a binary built for another CPU. Where there is no
compiler, or the build fails, `load()` returns None and the engine keeps its
torch-only path; the reason is logged once.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import logging
import os
import shutil
import subprocess
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("paged_decode.cpp")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-std=c++20", "-fPIC", "-shared")


def cache_dir() -> Path:
    from pdserve.common.model_loader import cache_dir as models_dir

    return models_dir().parent / "kernels"


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return ""


def library_path() -> Path:
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), torch.__version__.encode(), _cpu_flags().encode(), " ".join(FLAGS).encode()):
        key.update(part)
    return cache_dir() / f"paged_decode-{key.hexdigest()[:16]}.so"


def build(out: Path) -> None:
    """Compile SOURCE into `out` (atomically: concurrent workers wait on a lock, then reuse it)."""
    from torch.utils import cpp_extension

    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        raise RuntimeError("no C++ compiler (g++, or $CXX) on PATH")
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if out.exists():
            return
        tmp = out.with_suffix(f".{os.getpid()}.tmp")
        cmd = [
            compiler,
            *FLAGS,
            *(f"-I{p}" for p in cpp_extension.include_paths()),
            str(SOURCE),
            "-o",
            str(tmp),
            *(f"-L{p}" for p in cpp_extension.library_paths()),
            "-lc10",
            "-ltorch_cpu",
            "-ltorch",
        ]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            tmp.unlink(missing_ok=True)
            raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[-2000:]}")
        tmp.rename(out)


@functools.cache
def load() -> bool:
    """Build (first use on this machine, ~15 s on 2 cores) and load the kernels; False where they can't be."""
    if hasattr(torch.ops.pdserve, "paged_decode"):
        return True
    path = library_path()
    try:
        if not path.exists():
            log.info("building pdserve's CPU kernels into %s (once per machine)", path)
            build(path)
        torch.ops.load_library(str(path))
    except (OSError, RuntimeError) as e:
        log.warning("pdserve's CPU attention kernel is unavailable (%s); decode attention uses torch ops", e)
        return False
    return True
