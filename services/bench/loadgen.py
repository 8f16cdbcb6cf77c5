"""`pdserve bench load`: an open-loop load generator against a running router.

Each request leaves at its arrival time whatever the server is doing; the send lag shows a starved client.
`run_closed` is the closed loop, for finding the most a server sustains.
Why open loop, and the flags: docs/benchmarks.md ("Load generator").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import shlex
import sys
import time
from collections.abc import Awaitable, Callable

from pdserve.bench import senders, workload
from pdserve.bench.metrics import RequestRecord, Slo, format_summary, summarize
from pdserve.bench.workload import Request

Sender = Callable[[Request, RequestRecord, Callable[[], float]], Awaitable[None]]


class ProgressLine:
    """A progress bar on stderr: tqdm when installed, else a plain line."""

    def __init__(self, total: int, label: str = "load", enabled: bool = True):
        self.total = total
        self.label = label
        self.enabled = enabled
        self.sent = self.done = self.errors = 0
        self._bar = None
        self._last = 0.0
        if enabled:
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=total, desc=label, unit="req", file=sys.stderr, mininterval=0.5, leave=False)
            except ImportError:
                pass

    def on_sent(self) -> None:
        self.sent += 1

    def on_done(self, rec: RequestRecord) -> None:
        self.done += 1
        self.errors += rec.error is not None
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(in_flight=self.sent - self.done, errors=self.errors, refresh=False)
        elif self.enabled and (time.monotonic() - self._last > 0.5 or self.done == self.total):
            self._last = time.monotonic()
            print(
                f"\r[{self.label}] {self.done}/{self.total} done, {self.sent - self.done} in flight, "
                f"{self.errors} errors",
                end="",
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.enabled:
            print(file=sys.stderr, flush=True)


async def send_one(
    req: Request, send: Sender, now: Callable[[], float], progress: ProgressLine | None = None
) -> RequestRecord:
    """Send one request now and time it."""
    rec = RequestRecord(req.index, len(req.prompt), req.max_tokens, req.arrival_s, kind=req.kind)
    rec.sent_s = now()
    if progress:
        progress.on_sent()
    try:
        await send(req, rec, now)
    except Exception as e:  # a load generator counts failures; it does not stop at the first
        rec.error = type(e).__name__
    rec.done_s = now()
    if progress:
        progress.on_done(rec)
    return rec


async def run_open(requests: list[Request], send: Sender, progress: ProgressLine | None = None) -> list[RequestRecord]:
    """Send each request at its arrival time; return their records once all finished."""
    t0 = time.perf_counter()

    def now() -> float:
        return time.perf_counter() - t0

    tasks = []
    for req in requests:
        delay = req.arrival_s - now()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(send_one(req, send, now, progress)))
    return list(await asyncio.gather(*tasks))


async def run_closed(
    make: Callable[[int], Request], send: Sender, concurrency: int, duration_s: float
) -> list[RequestRecord]:
    """`concurrency` streams, each sending its next request when the last one
    finished, until duration_s; requests started later are not counted."""
    t0 = time.perf_counter()

    def now() -> float:
        return time.perf_counter() - t0

    counter = iter(range(1 << 62))

    async def loop() -> list[RequestRecord]:
        out = []
        while now() < duration_s:
            req = make(next(counter))
            req.arrival_s = now()
            out.append(await send_one(req, send, now))
        return out

    return [r for rs in await asyncio.gather(*(loop() for _ in range(concurrency))) for r in rs]


async def warm_up(send: Sender, n: int) -> None:
    """A few small requests one at a time: connections, caches and threads warm, nothing timed."""
    for r in workload.synthetic(
        n, math.inf, workload.LengthDist("fixed", 32), workload.LengthDist("fixed", 4), seed=-1
    ):
        await send_one(r, send, time.perf_counter)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default="localhost:50051", help="the router's gRPC address")
    p.add_argument(
        "--http",
        default=None,
        metavar="URL",
        help="use the OpenAI endpoint instead (e.g. http://localhost:8000/v1): streamed /v1/completions",
    )
    p.add_argument(
        "--client",
        choices=["stub", "sdk"],
        default="stub",
        help="gRPC: the raw Router stub, or the client SDK (pdserve.client)",
    )
    p.add_argument("--api-key", default=None, help="the router's API key (default: env PDSERVE_API_KEY)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--warmup", type=int, default=2, help="small untimed requests first")
    p.add_argument("--slo-ttft-ms", type=float, default=math.inf, help="goodput: TTFT objective")
    p.add_argument(
        "--slo-ttft-ms-per-token",
        type=float,
        default=0.0,
        help="goodput: TTFT objective grows by this per prompt token",
    )
    p.add_argument("--slo-tpot-ms", type=float, default=math.inf, help="goodput: time-per-output-token objective")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", default=None, help="write the summary and every request's timings here")
    workload.add_args(p)


async def _run(args: argparse.Namespace, requests: list[Request]) -> list[RequestRecord]:
    send = senders.make(args.target, args.http, args.client, args.timeout, args.api_key)
    try:
        await warm_up(send, args.warmup)
        progress = ProgressLine(len(requests), enabled=not args.no_progress)
        try:
            return await run_open(requests, send, progress)
        finally:
            progress.close()
    finally:
        await send.close()


def command_line() -> str:
    return shlex.join(["pdserve", *sys.argv[1:]])


def main(args: argparse.Namespace) -> int:
    requests = workload.from_args(args)
    records = asyncio.run(_run(args, requests))
    summary = summarize(records, Slo(args.slo_ttft_ms, args.slo_tpot_ms, args.slo_ttft_ms_per_token))
    print(format_summary(summary))
    if args.json:
        from pdserve.bench.limits import machine

        out = {
            "command": command_line(),
            "machine": machine(),
            "target": args.http or args.target,
            "client": "http" if args.http else args.client,
            "workload": workload.describe(args),
            "summary": summary,
            "requests": [r.as_dict() for r in records],
        }
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0
