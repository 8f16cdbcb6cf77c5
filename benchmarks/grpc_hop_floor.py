"""What one Python gRPC hop costs, with none of pdserve's code: the floor under the router.

    .venv/bin/python benchmarks/grpc_hop_floor.py [--seconds 5] [--streams 32] [--runs 2]

Three processes, pinned as `pdserve bench control-plane` pins them: a proxy
("router", core 0) relays a server-streaming call to a backend (core 1), and
a closed-loop client (core 1) calls the proxy. Messages are raw bytes (no
protobuf), one response per request, no interceptors, metrics or logging.
Two ways for the proxy to reach the backend:
  per-request  one downstream server-streaming RPC per request (pdserve's router today)
  multiplexed  one long-lived bidirectional stream, requests and responses tagged
               by id (what SGLang's and vLLM's front ends do over ZMQ)
It prints requests/s and the proxy's CPU time per request (from /proc).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import struct
import subprocess
import sys
import time

import grpc

BACKEND, PROXY = "127.0.0.1:61001", "127.0.0.1:61002"


def _ident(b: bytes) -> bytes:
    return b


def _stream(fn):
    return grpc.unary_stream_rpc_method_handler(fn, request_deserializer=_ident, response_serializer=_ident)


async def backend() -> None:
    async def generate(request: bytes, context):
        yield b"token" + request[:8]

    async def session(requests, context):  # each request answered on the one stream, id first
        answers: asyncio.Queue = asyncio.Queue()

        async def read() -> None:
            async for r in requests:
                answers.put_nowait(r[:8] + b"token")
            answers.put_nowait(None)

        reader = asyncio.create_task(read())
        while (a := await answers.get()) is not None:
            yield a
        await reader

    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "B",
                {
                    "Generate": _stream(generate),
                    "Session": grpc.stream_stream_rpc_method_handler(
                        session, request_deserializer=_ident, response_serializer=_ident
                    ),
                },
            )
        ]
    )
    server.add_insecure_port(BACKEND)
    await server.start()
    await server.wait_for_termination()


async def proxy(mode: str) -> None:
    channel = grpc.aio.insecure_channel(BACKEND)
    downstream = channel.unary_stream("/B/Generate", request_serializer=_ident, response_deserializer=_ident)
    waiting: dict[bytes, asyncio.Future] = {}
    outbox: asyncio.Queue = asyncio.Queue()
    pumps: set[asyncio.Task] = set()  # held here, for as long as the proxy serves
    if mode == "multiplexed":
        call = channel.stream_stream("/B/Session", request_serializer=_ident, response_deserializer=_ident)(
            wait_for_ready=True
        )  # the backend may start later

        async def write() -> None:  # one writer: a stream takes one write at a time
            while True:
                await call.write(await outbox.get())

        async def read() -> None:
            async for answer in call:
                waiting.pop(answer[:8]).set_result(answer)

        pumps.update((asyncio.create_task(write()), asyncio.create_task(read())))
    counter = iter(range(1, 2**62))

    async def generate(request: bytes, context):
        if mode == "multiplexed":
            key = struct.pack("<Q", next(counter))
            waiting[key] = asyncio.get_running_loop().create_future()
            outbox.put_nowait(key + request)
            yield await waiting[key]
        else:
            async for answer in downstream(request, timeout=60, wait_for_ready=True):
                yield answer

    server = grpc.aio.server()
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("P", {"Generate": _stream(generate)})])
    server.add_insecure_port(PROXY)
    await server.start()
    await server.wait_for_termination()


def _cpu_s(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def client(proxy_pid: int, seconds: float, streams: int) -> tuple[float, float]:
    async with grpc.aio.insecure_channel(PROXY) as channel:
        call = channel.unary_stream("/P/Generate", request_serializer=_ident, response_deserializer=_ident)

        async def loop(until: float) -> int:
            n = 0
            while time.perf_counter() < until:
                async for _ in call(b"12345678 prompt", timeout=10):
                    pass
                n += 1
            return n

        await asyncio.gather(*(loop(time.perf_counter() + 1.0) for _ in range(8)))  # warm up
        cpu0, t0 = _cpu_s(proxy_pid), time.perf_counter()
        n = sum(await asyncio.gather(*(loop(t0 + seconds) for _ in range(streams))))
        elapsed = time.perf_counter() - t0
        return n / elapsed, 1e3 * (_cpu_s(proxy_pid) - cpu0) / n


def _spawn(role: str, mode: str, core: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, __file__, "--role", role, "--mode", mode], preexec_fn=lambda: os.sched_setaffinity(0, {core})
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--streams", type=int, default=32, help="closed-loop client streams")
    p.add_argument("--runs", type=int, default=2, help="runs of each mode, alternating")
    p.add_argument("--role", choices=["backend", "proxy"], help=argparse.SUPPRESS)
    p.add_argument("--mode", default="per-request", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.role:
        asyncio.run(backend() if args.role == "backend" else proxy(args.mode))
        return
    cores = sorted(os.sched_getaffinity(0))
    proxy_core, other = cores[0], cores[-1]
    os.sched_setaffinity(0, {other})
    print(
        f"proxy on core {proxy_core}; backend and client on core {other}; {args.streams} client streams, "
        f"{args.seconds:g} s per run"
    )
    for _ in range(args.runs):
        for mode in ("per-request", "multiplexed"):
            procs = [_spawn("backend", mode, other), _spawn("proxy", mode, proxy_core)]
            try:
                time.sleep(2.0)  # both listening
                rps, cpu_ms = asyncio.run(client(procs[1].pid, args.seconds, args.streams))
                print(f"{mode:12s} {rps:6.0f} req/s, proxy CPU {cpu_ms:.3f} ms/request")
            finally:
                for proc in procs:
                    proc.terminate()
                    proc.wait()


if __name__ == "__main__":
    main()
