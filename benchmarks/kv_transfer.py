"""KV transfer bandwidth between two processes over UCX, against memcpy.

    .venv/bin/python benchmarks/kv_transfer.py [--sizes-mb 4 16 64] [--reps 10] [--chunks 1] [--variants seam ...]
                                               [--device cuda]

A receiver process (decode-like) and a sender process (prefill-like) each hold a
block-major KV pool of SmolLM2-sized blocks (737,280 bytes). Per size and
variant it reports the median GB/s over --reps transfers (after 2 warm-ups),
timed from the sender's start to the receiver seeing every block (clocks are
CLOCK_MONOTONIC, shared by both processes). Variants:
  seam        UcxKVSender -> UcxKVReceiver: keyed tags, headers, checksums both sides
  raw-blocks  the same messages without headers or checksums (transport only)
  raw-one     the whole run as one message (the pool is block-major, so a run of
              adjacent blocks is one buffer): the transport's ceiling
memcpy is torch's copy of the same bytes in the receiver (the fastest of one
thread and all threads, on 4 KiB and on 2 MiB pages); the goal is seam >= 50%
of memcpy. UCX_PROTO_INFO=y is set in the children and the protocol that
carried block-sized messages is printed.
--device cuda puts both pools on the GPU: the seam then stages every block
through the pools' pinned host mirrors (transfer/staging.py), the raw variants
move the mirrors alone, and the copy from a mirror to the GPU (h2d) is
printed as a second reference.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time

BLOCK_BYTES = 737_280  # SmolLM2-135M: 30 layers x 2 x 16 tokens x 3 kv heads x 64 x fp32
MB = 1 << 20
VARIANTS = ["seam", "raw-blocks", "raw-one"]


def _spec():
    from pdserve.common.kv.spec import KVSpec

    return KVSpec("SmolLM2-135M-Instruct", "bench", num_layers=30, num_kv_heads=3, head_dim=64)


async def _receiver(conn, max_blocks: int, reps: int, device: str) -> None:
    import torch

    from pdserve.common.kv import host_memory
    from pdserve.common.kv.pool import KVPool
    from pdserve.common.transfer import UcxKVReceiver
    from pdserve.common.transfer.base import _as_bytes

    pool = KVPool(_spec(), max_blocks, device)
    host = pool.tensor if pool.host is None else pool.host  # what the transport moves
    rx = UcxKVReceiver()
    w = rx._w  # the raw variants use the same worker, minus the seam's protocol
    loop = asyncio.get_running_loop()
    conn.send(rx.address)
    while True:
        cmd, *a = await loop.run_in_executor(None, conn.recv)
        if cmd == "stop":
            await rx.close()
            conn.send(None)
            return
        if cmd == "memcpy":  # torch copy of the same bytes: the best of 1 thread and all,
            # on plain pages and on huge pages (what the pools use)
            numel = a[0] * pool.spec.block_bytes // 4
            best, threads = None, torch.get_num_threads()
            for pages, alloc in (("4 KiB", torch.zeros), ("2 MiB", lambda n: host_memory.zeros((n,), torch.float32))):
                src, dst = alloc(numel).normal_(), alloc(numel)
                for n_threads in sorted({1, threads}):
                    torch.set_num_threads(n_threads)
                    times = []
                    for _ in range(reps + 2):
                        t0 = time.perf_counter()
                        dst.copy_(src)
                        times.append(time.perf_counter() - t0)
                    if best is None or statistics.median(times[2:]) < statistics.median(best[0]):
                        best = (times[2:], f"{n_threads} threads, {pages} pages")
                del src, dst
            torch.set_num_threads(threads)
            conn.send(best)
            continue
        if cmd == "h2d":  # a device pool's copy in from its pinned mirror, same bytes
            times = []
            for _ in range(reps + 2):
                t0 = time.perf_counter()
                pool.tensor[: a[0]].copy_(host[: a[0]], non_blocking=True)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            conn.send(times[2:])
            continue
        variant, tid, n = cmd, a[0], a[1]
        if variant == "seam":
            conn.send(rx.expect(tid, [pool.block(b) for b in range(n)]))
            await rx.wait(tid, 60)
            await rx.cancel(tid)
        else:
            base = int.from_bytes(tid.encode()[-6:], "little") << 16
            if variant == "raw-one":
                bufs = [_as_bytes(host[:n])]
            else:
                bufs = [_as_bytes(host[b]) for b in range(n)]
            reqs = [w.worker.tag_recv(w.Array(b), w.tag(base + i)) for i, b in enumerate(bufs)]
            group = w.watch(reqs)
            conn.send(base)
            await group.future
            for r in reqs:
                r.check_error()
        conn.send(time.perf_counter())


async def _sender(conn, max_blocks: int, device: str) -> None:
    import torch

    from pdserve.common.kv.pool import KVPool
    from pdserve.common.transfer import UcxKVSender
    from pdserve.common.transfer.base import _as_bytes

    pool = KVPool(_spec(), max_blocks, device)
    pool.tensor.copy_(torch.randn_like(pool.tensor))
    host = pool.tensor if pool.host is None else pool.host
    if pool.host is not None:
        host.copy_(pool.tensor)  # the raw variants move the mirror as it stands
    tx = UcxKVSender()
    w = tx._w
    loop = asyncio.get_running_loop()
    conn.send("ready")
    while True:
        cmd, *a = await loop.run_in_executor(None, conn.recv)
        if cmd == "stop":
            await tx.close()
            conn.send(None)
            return
        variant, target, n, chunks = cmd, a[0], a[1], a[2]
        t0 = time.perf_counter()
        if variant == "seam":  # one send() per prefill chunk, issued back to back
            step = -(-n // chunks)
            await asyncio.gather(
                *[
                    tx.send(target, s, [pool.block(b) for b in range(s, min(n, s + step))], timeout=60)
                    for s in range(0, n, step)
                ]
            )
        else:
            address, base = target
            ep = tx._eps.get(address) or tx._eps.setdefault(address, w.endpoint(address))
            bufs = [_as_bytes(host[:n])] if variant == "raw-one" else [_as_bytes(host[b]) for b in range(n)]
            await w.watch([ep.tag_send(w.Array(b), w.tag(base + i)) for i, b in enumerate(bufs)]).future
        conn.send(t0)


def _child(role: str, conn, max_blocks: int, reps: int, log_path: str, device: str) -> None:
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)  # UCX_PROTO_INFO tables go to stdout; keep them for the report
    main = _receiver(conn, max_blocks, reps, device) if role == "recv" else _sender(conn, max_blocks, device)
    asyncio.run(main)


def _protocols(log_path: str) -> set[str]:
    """The UCX protocol rows that cover block-sized tagged host messages."""
    rows = set()
    for line in open(log_path, errors="replace"):
        if "8K..inf" in line or "..inf" in line and "|" in line:
            cells = [c.strip() for c in line.split("|") if c.strip()]
            if len(cells) >= 3:
                rows.add(f"{cells[-3]}: {cells[-2]} over {cells[-1]}")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes-mb", type=int, nargs="+", default=[4, 16, 64])
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--chunks", type=int, default=1, help="send() calls per transfer (prefill chunks)")
    p.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    p.add_argument("--device", default="cpu", help="where both KV pools live (cpu, cuda)")
    args = p.parse_args()
    os.environ.setdefault("UCX_PROTO_INFO", "y")
    sizes = {mb: -(-mb * MB // BLOCK_BYTES) for mb in args.sizes_mb}  # MB -> whole blocks
    max_blocks = max(sizes.values())
    ctx = mp.get_context("spawn")
    tmp = tempfile.mkdtemp(prefix="kv-bench-")
    logs = {r: os.path.join(tmp, f"{r}.log") for r in ("recv", "send")}
    pipes, procs = {}, []
    for role in ("recv", "send"):
        parent, child = ctx.Pipe()
        proc = ctx.Process(
            target=_child, args=(role, child, max_blocks, args.reps, logs[role], args.device), daemon=True
        )
        proc.start()
        pipes[role], procs = parent, procs + [proc]
    rx, tx = pipes["recv"], pipes["send"]
    address = rx.recv()
    assert tx.recv() == "ready"

    print(
        f"machine: {os.cpu_count()} cores, python {sys.version.split()[0]}, pools on {args.device}, "
        f"UCXPY/UCX env: {sorted(k + '=' + v for k, v in os.environ.items() if k.startswith('UCX'))}"
    )
    print(f"{'size':>8} {'blocks':>6} {'variant':>11} {'median GB/s':>12} {'min':>6} {'max':>6} {'vs memcpy':>10}")
    n_id = 0
    for mb, n in sizes.items():
        nbytes = n * BLOCK_BYTES
        rx.send(("memcpy", n))
        times, threads = rx.recv()
        memcpy = statistics.median(nbytes / t / 1e9 for t in times)
        print(
            f"{nbytes / MB:7.1f}M {n:6d} {'memcpy':>11} {memcpy:12.2f} "
            f"{nbytes / max(times) / 1e9:6.2f} {nbytes / min(times) / 1e9:6.2f} {'':>10}  (torch, {threads})"
        )
        if args.device != "cpu":
            rx.send(("h2d", n))
            h2d = rx.recv()
            print(
                f"{nbytes / MB:7.1f}M {n:6d} {'h2d':>11} {statistics.median(nbytes / t / 1e9 for t in h2d):12.2f} "
                f"{nbytes / max(h2d) / 1e9:6.2f} {nbytes / min(h2d) / 1e9:6.2f} {'':>10}  "
                f"(pinned mirror -> {args.device})"
            )
        for variant in args.variants:
            bw = []
            for rep in range(args.reps + 2):
                n_id += 1
                rx.send((variant, f"bench-{n_id:06d}", n))
                target = rx.recv() if variant == "seam" else (address, rx.recv())
                tx.send((variant, target, n, args.chunks))
                t0, t1 = tx.recv(), rx.recv()
                if rep >= 2:
                    bw.append(nbytes / (t1 - t0) / 1e9)
            med = statistics.median(bw)
            print(
                f"{nbytes / MB:7.1f}M {n:6d} {variant:>11} {med:12.2f} {min(bw):6.2f} {max(bw):6.2f} "
                f"{med / memcpy:9.0%}{'  goal met' if variant == 'seam' and med >= 0.5 * memcpy else ''}"
            )
    for pipe in (tx, rx):
        pipe.send(("stop",))
        pipe.recv()
    for proc in procs:
        proc.join(10)
    print("UCX protocols chosen for >= 8 KB tagged host messages (UCX_PROTO_INFO=y):")
    for row in sorted(_protocols(logs["recv"]) | _protocols(logs["send"])):
        print("  ", row)


if __name__ == "__main__":
    main()
