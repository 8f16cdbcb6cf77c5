"""The float32 row kernel against MKL at each row count, and the reach the engine would time here.

    .venv/bin/python benchmarks/row_kernel.py [--rows 1 8 16 32 64 128 256 1024]

A decode step's 120 layer matmuls at SmolLM2-135M's shapes (30 layers of q/k/v, o, gate/up and down,
distinct float32 weights), through `torch.ops.pdserve.linear_f32` (kernels/linear.cpp) and through
`F.linear` (MKL), alternated, medians, with the matmul ceiling (a 2,048-square `torch.mm`) beside
them. Run it under `--as-cpu avx2`'s variables (bench/cpu_isa.py) for an AVX2-only CPU's paths.
docs/engine.md ("How far the row kernel reaches") has figures.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from pdserve.bench.limits import alternated, best_time, cpu_name, matmul_probe
from pdserve.common.engine import kernels, rows_reach

LAYERS = 30
SHAPES = ((960, 576), (576, 576), (3072, 576), (576, 1536))  # (out, in): q/k/v, o, gate/up, down


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 16, 32, 64, 128, 256, 1024])
    ap.add_argument("--reps", type=int, default=9)
    args = ap.parse_args()
    if not kernels.load():
        raise SystemExit("skipped: the kernels did not build here (no g++?)")
    torch.manual_seed(0)
    weights = [torch.randn(out, k) * 0.05 for _ in range(LAYERS) for out, k in SHAPES]
    matmul, flops = matmul_probe()
    ceiling = flops / best_time(matmul, 5) / 1e9
    print(f"machine: {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"float32 matmul ceiling {ceiling:.0f} GFLOP/s")
    for m in args.rows:
        x = {k: torch.randn(m, k) for _, k in SHAPES}
        ms = alternated(
            {
                "row kernel": lambda: [torch.ops.pdserve.linear_f32(x[w.shape[1]], w) for w in weights],
                "MKL": lambda: [F.linear(x[w.shape[1]], w) for w in weights],
            },
            args.reps,
        )
        gflop = 2 * m * sum(w.numel() for w in weights) / 1e9
        ours, mkl = ms["row kernel"], ms["MKL"]
        print(
            f"{m:5d} rows: row kernel {ours:8.1f} ms ({gflop / ours * 1e3:4.0f} GFLOP/s), "
            f"MKL {mkl:8.1f} ms ({gflop / mkl * 1e3:4.0f} GFLOP/s): {ours / mkl:.2f}x"
        )
    out, k = SHAPES[2]
    print(f"reach the engine times here: {rows_reach.reach(out, k, torch.get_num_threads())} rows")


if __name__ == "__main__":
    main()
