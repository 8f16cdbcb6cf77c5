"""pdserve's own CPU kernels: C++ sources built once per machine with g++, loaded as torch ops.

The build is cached under the pdserve cache directory, keyed by the sources, the
torch version, this CPU's flags and the target (-march=native, or $PDSERVE_KERNEL_MARCH,
e.g. x86-64-v3 to run the AVX2 paths on an AVX-512 machine), so a shared home
directory never loads a binary built for another CPU; so is each source's object, so an
edit to one source recompiles that one. Where there is no compiler, or the build fails,
`load()` returns False and the engine keeps its torch-only path; the reason is logged once.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import logging
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from pdserve.common import cache_dirs

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
SOURCES = tuple(
    HERE / f
    for f in (
        "paged_decode.cpp",
        "layer_ops.cpp",
        "linear.cpp",
        "linear_float_panels.cpp",
        "qkv_rope.cpp",
        "linear_norm.cpp",
        "prefill_attention.cpp",
        "decode_layers.cpp",
        "greedy.cpp",
    )
)
HEADERS = tuple(
    HERE / f
    for f in (
        "vec.h",
        "amx.h",
        "rms_norm.h",
        "decode_span.h",
        "decode_span_avx2.h",
        "decode_tiles.h",
        "panels.h",
        "tile_product.h",
        "panel_product.h",
        "row_kernel.h",
        "float_panels.h",
        "prefill_task.h",
    )
)
# -ffp-contract=off: no fused multiply-adds where the source rounds a product, so the
# layer ops round as torch's unfused ops do.
FLAGS = (
    "-O3",
    f"-march={os.environ.get('PDSERVE_KERNEL_MARCH', 'native')}",
    "-fopenmp",
    "-fno-math-errno",
    "-ffp-contract=off",
    "-std=c++20",
    "-fPIC",
)


def cache_dir() -> Path:
    return cache_dirs.writable("kernels")  # a read-only image's cache: under the home or /tmp


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return ""


def _key(*parts: bytes) -> str:
    """A hash of parts and of what every build shares: the headers, torch, this CPU's flags and FLAGS."""
    key = hashlib.sha256()
    shared = (*(p.read_bytes() for p in HEADERS), torch.__version__.encode(), _cpu_flags().encode())
    for part in (*parts, *shared, " ".join(FLAGS).encode()):
        key.update(part)
    return key.hexdigest()[:16]


def library_path() -> Path:
    return cache_dir() / f"pdserve_kernels-{_key(*(p.read_bytes() for p in SOURCES))}.so"


def _compile(compiler: str, includes: list[str], source: Path, objects: Path) -> Path:
    """source's object in `objects`, compiled unless one of the same inputs is there (an edit to one
    source recompiles that source alone)."""
    obj = objects / f"{source.stem}-{_key(source.read_bytes(), compiler.encode())}.o"
    if obj.exists():
        return obj
    obj.parent.mkdir(parents=True, exist_ok=True)
    tmp = obj.with_suffix(f".{os.getpid()}.tmp")
    done = subprocess.run(
        [compiler, *FLAGS, *includes, "-c", str(source), "-o", str(tmp)], capture_output=True, text=True
    )
    if done.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"{compiler} failed on {source.name}: {done.stderr.strip()[-2000:]}")
    tmp.rename(obj)
    return obj


def build(out: Path) -> None:
    """Compile SOURCES into `out`: as many sources at once as this process has cores (a worker's
    first start waits on it), then one link. Atomic: concurrent workers wait on a lock, then reuse it."""
    from torch.utils import cpp_extension

    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        raise RuntimeError("no C++ compiler (g++, or $CXX) on PATH")
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if out.exists():
            return
        with ThreadPoolExecutor(max_workers=len(os.sched_getaffinity(0))) as pool:
            includes = [f"-I{p}" for p in cpp_extension.include_paths()]
            objects = list(
                pool.map(lambda source: _compile(compiler, includes, source, out.parent / "objects"), SOURCES)
            )
        tmp = out.with_suffix(f".{os.getpid()}.tmp")
        libs = (f"-L{p}" for p in cpp_extension.library_paths())
        cmd = [
            compiler,
            "-shared",
            "-fopenmp",
            *map(str, objects),
            "-o",
            str(tmp),
            *libs,
            "-lc10",
            "-ltorch_cpu",
            "-ltorch",
        ]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            tmp.unlink(missing_ok=True)
            raise RuntimeError(f"{compiler} failed to link: {done.stderr.strip()[-2000:]}")
        tmp.rename(out)


@functools.cache
def load() -> bool:
    """Build (first use on this machine, ~40 s on 2 cores) and load the kernels; False where they can't be."""
    if hasattr(torch.ops.pdserve, "linear_f32"):
        return True
    path = library_path()
    try:
        if not path.exists():
            log.info("building pdserve's CPU kernels into %s (once per machine)", path)
            build(path)
        torch.ops.load_library(str(path))
    except (OSError, RuntimeError) as e:
        log.warning("pdserve's CPU kernels are unavailable (%s); the engine runs on torch ops alone", e)
        return False
    return True


def vectorized() -> bool:
    """Whether the kernels are built with AVX-512: without it the fused layers' loops lose to torch's ops."""
    return load() and bool(torch.ops.pdserve.vectorized())


@functools.cache
def linear_tiles() -> bool:
    """Whether bf16 matmuls can run over pack_vnni's panels here (linear.cpp): AMX tiles or AVX512_BF16."""
    return load() and torch.ops.pdserve.pack_vnni(torch.zeros(16, 32, dtype=torch.bfloat16)).numel() > 0


@functools.cache
def float_panels() -> bool:
    """Whether float32 weights are packed into 16-column panels here (float_panels.h): AVX2 builds."""
    return load() and bool(torch.ops.pdserve.float_panels_built())


@functools.cache
def amx() -> bool:
    """Whether bf16 matmuls run through AMX tiles here, not on vectors (int8 weights need them)."""
    return load() and bool(torch.ops.pdserve.amx_usable())


def decode_tiles(dtype: torch.dtype, heads: int, head_dim: int, block_size: int) -> bool:
    """Whether decode attention runs k . q^T through AMX tiles (decode_tiles.h): bf16, AMX, up to 16
    query heads of 64 or 128, blocks of a multiple of 16 keys."""
    return (
        dtype == torch.bfloat16 and load() and bool(torch.ops.pdserve.decode_tiles_usable(heads, head_dim, block_size))
    )


def prefill_kernel(dtype: torch.dtype, head_dim: int) -> bool:
    """Whether prefill attention runs through pdserve's kernel (prefill_attention.cpp): bf16, AMX or
    AVX512_BF16, head dim 64 or 128."""
    return dtype == torch.bfloat16 and load() and bool(torch.ops.pdserve.prefill_attention_usable(head_dim))
