"""The dtype a worker computes and keeps its KV cache in: `auto` resolved once, with the reason.

`auto` is bfloat16 where matmuls run natively in it (CUDA; CPUs with AMX or AVX512-BF16,
where oneDNN measured 2-2.5x fp32's speed on batched matmuls) and float32 elsewhere, including
where $ONEDNN_MAX_CPU_ISA holds oneDNN below those instructions (as on an AVX2-only CPU).
bfloat16 given there runs on pdserve's row kernel (docs/engine.md, "bf16 without AVX512_BF16").
docs/engine.md ("Precision") has the figures.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from pdserve.common.config import SettingError

DTYPES = ("float32", "bfloat16", "float16")
CHOICES = ("auto", *DTYPES)
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of native bf16 matmuls
# oneDNN's ISA caps below AVX512_CORE_BF16: there bf16 matmuls are emulated (a prefill's took 7x fp32's time at AVX2).
ONEDNN_CAPS_WITHOUT_BF16 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI")


@dataclass(frozen=True)
class Precision:
    dtype: str  # one of DTYPES
    reason: str

    def __str__(self) -> str:
        return f"dtype {self.dtype} ({self.reason})"


def cpu_bf16_flag(cpuinfo: str = "/proc/cpuinfo") -> str | None:
    """The first of BF16_CPU_FLAGS this CPU has; None without one (or without /proc/cpuinfo)."""
    try:
        with open(cpuinfo) as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return None
    return next((flag for flag in BF16_CPU_FLAGS if flag in flags), None)


def resolve(
    requested: str, device: str = "cpu", model_dtype: str | None = None, cpuinfo: str = "/proc/cpuinfo"
) -> Precision:
    """The dtype to run in. `model_dtype`: that of a model already loaded, which `auto` keeps."""
    if requested not in CHOICES:
        raise SettingError("dtype", f"must be one of {', '.join(CHOICES)}, not {requested!r}")
    if requested != "auto":
        return Precision(requested, "given")
    if model_dtype is not None:
        return Precision(model_dtype, "auto: the loaded model's")
    if device.startswith("cuda"):
        return Precision("bfloat16", "auto: CUDA")
    if device != "cpu":
        return Precision("float32", f"auto: {device}")
    flag = cpu_bf16_flag(cpuinfo)
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    if flag and cap in ONEDNN_CAPS_WITHOUT_BF16:
        return Precision("float32", f"auto: the CPU has {flag}, but ONEDNN_MAX_CPU_ISA={cap}")
    if flag:
        return Precision("bfloat16", f"auto: the CPU has {flag}")
    return Precision("float32", f"auto: the CPU has none of {', '.join(BF16_CPU_FLAGS)}")
