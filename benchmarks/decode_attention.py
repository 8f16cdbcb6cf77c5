"""Batched decode attention against the time it takes to read its KV, measured in the same run.

    .venv/bin/python benchmarks/decode_attention.py [--seqs 32] [--context 529] [--dtype bfloat16]

A decode step's attention for every layer of SmolLM2-135M's shape (30 layers, 9 query and 3 KV
heads of 64): `torch.ops.pdserve.paged_decode` over blocks scattered across a pool of a worker's
size (1 GiB), against
- the read floor: a contiguous `sum` over as many bytes as the step's KV;
- the kernel on one layer's blocks 30 times, whose 13 MB (at the defaults) then come from the
  last-level cache: the arithmetic with little of the memory's latency.
Medians of alternated runs, with the CPU. docs/benchmarks.md ("Batched decode attention") has figures.
"""

from __future__ import annotations

import argparse

import torch

from pdserve.bench.limits import alternated, cpu_name
from pdserve.common.engine import kernels
from pdserve.common.kv import host_memory

LAYERS, BLOCK, KV_HEADS, HEADS, HEAD_DIM = 30, 16, 3, 9, 64


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqs", type=int, default=32)
    ap.add_argument("--context", type=int, default=529, help="the 32-sequence bench step's mean context")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--reps", type=int, default=12)
    ap.add_argument(
        "--pool-gib", type=float, default=1.0, help="the pool the blocks are scattered over (a worker's default)"
    )
    args = ap.parse_args()
    if not kernels.load():
        raise SystemExit("skipped: the kernels did not build here (no g++?)")
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    per_seq = -(-args.context // BLOCK)
    block_bytes = LAYERS * 2 * BLOCK * KV_HEADS * HEAD_DIM * dtype.itemsize
    blocks = max(args.seqs * per_seq + 8, int(args.pool_gib * 2**30) // block_bytes)
    pool = host_memory.zeros((blocks, LAYERS, 2, BLOCK, KV_HEADS, HEAD_DIM), dtype)
    pool.normal_()  # faulted in, as a pool that has served a while
    tables = torch.randperm(pool.shape[0])[: args.seqs * per_seq].view(args.seqs, per_seq).contiguous()
    lens = torch.full((args.seqs,), args.context)
    q = torch.randn(args.seqs, HEADS, HEAD_DIM, dtype=dtype)
    nbytes = args.seqs * args.context * KV_HEADS * HEAD_DIM * 2 * dtype.itemsize * LAYERS
    flat = torch.randn(nbytes // 4)  # as many bytes, read contiguously

    def kernel(hot: bool):
        return lambda: [
            torch.ops.pdserve.paged_decode(q, pool, 0 if hot else layer, tables, lens, HEAD_DIM**-0.5)
            for layer in range(LAYERS)
        ]

    times = alternated(
        {"paged_decode": kernel(False), "read floor": lambda: flat.sum(), "one layer again": kernel(True)}, args.reps
    )
    print(f"machine: {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(
        f"{args.seqs} sequences at context {args.context}, {args.dtype}, {LAYERS} layers: "
        f"{nbytes / 1e6:.0f} MB of KV a step"
    )
    floor = times["read floor"]
    for name, ms in times.items():
        print(f"  {name:15s} {ms:7.2f} ms  {nbytes / ms / 1e6:5.1f} GB/s  {ms / floor:.2f}x the read floor")


if __name__ == "__main__":
    main()
