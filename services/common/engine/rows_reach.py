"""How many rows a matmul takes through pdserve's row kernel before MKL's takes over, timed here.

Held to AVX2 on an Intel Xeon, MKL's matmul won from 32 rows; on an AMD EPYC (Zen 5) the row kernel won
up to 128 rows as AVX2 and at every size tried with AVX-512 (docs/engine.md, "How far the row kernel
reaches"). So the split is measured once a process, on the shape of the model's widest layer.
A bf16 weight (a CPU without AVX512_BF16, so without panels) goes to MKL widened to float32: oneDNN's
bf16 matmul there is emulated (docs/engine.md, "bf16 without AVX512_BF16").
"""

from __future__ import annotations

import functools
import statistics
import time

import torch
import torch.nn.functional as F

# The row kernel won up to here on every CPU measured: not timed.
ALWAYS = 16
# Each is kept only if the row kernel was at least as fast there, and every smaller one was.
CANDIDATES = (32, 64, 128, 256, 512, 1024)
REPS = 7


def beyond(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """What a row-kernel layer runs past its reach: MKL's float32 matmul, a bf16 weight widened for it
    (a copy as long as the call) and the result rounded back once."""
    if weight.dtype == torch.float32:
        return F.linear(x, weight)
    return F.linear(x.float(), weight.float()).to(x.dtype)


def _ratio(ours, theirs, reps: int) -> float:
    """Median time of ours over theirs, called in turn (so they share the host's drift) after a warm-up."""
    times: tuple[list[float], list[float]] = ([], [])
    for i in range(reps + 2):
        for f, ts in zip((ours, theirs), times):
            t = time.perf_counter()
            f()
            if i >= 2:
                ts.append(time.perf_counter() - t)
    return statistics.median(times[0]) / statistics.median(times[1])


@functools.cache
def reach(out_features: int, in_features: int, threads: int, dtype: torch.dtype = torch.float32) -> int:
    """The most rows (ALWAYS or one of CANDIDATES) up to which the row kernel's [rows, in] x [out, in]^T
    in `dtype` was no slower than `beyond`, on `threads` torch threads (the cache key: a worker sets
    its threads before it loads)."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(out_features, in_features, generator=generator).to(dtype)
    rows = ALWAYS
    for m in CANDIDATES:
        x = torch.randn(m, in_features, generator=generator).to(dtype)
        ours = lambda: torch.ops.pdserve.linear_rows(x, weight)  # noqa: E731
        mkl = lambda: beyond(x, weight)  # noqa: E731
        # Both read the weight from cache (after _ratio's two warm-up rounds), as a compute-bound step
        # does. A loss is timed again before it counts: a burst of the host's other load once cost the
        # row kernel 32 rows it had won.
        if _ratio(ours, mkl, REPS) > 1 and _ratio(ours, mkl, REPS) > 1:
            break
        rows = m
    return rows
