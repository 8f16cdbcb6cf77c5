"""`pdserve bench peer`: pdserve beside other servers of the same model, under the same open-loop load.

Rate by rate, every system runs once from a fresh start, in an order rotated per rate (`schedule`), with an
uncounted warm-up; writes peer.json, peer.md and the plots into --out. Peers: `--install NAME` (peers.py).
Why this order, and results: docs/benchmarks.md ("pdserve beside other servers").
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

from pdserve.bench import cpu_isa, peer_report, peers, plots, senders, workload
from pdserve.bench.loadgen import ProgressLine, command_line, run_open
from pdserve.bench.metrics import RequestRecord, Slo
from pdserve.common import ports

SYSTEMS = ("pdserve", "pdserve-colocated", "pdserve-bf16", "vllm", "vllm-fp32", "transformers", "llamacpp")
DEFAULT_SYSTEMS = [s for s in SYSTEMS if s not in ("pdserve-bf16", "vllm-fp32")]  # a dtype's comparison, by name
ALL_RATES = "*"  # the rate key of a skip that holds for every rate
PORTS_A_SYSTEM = 40  # pdserve's HTTP and gRPC ports, then its workers' and KV store's from +10
# ordinary words; a prompt is a random draw, so no two requests share a prefix
WORDS = (
    "time year people way day man thing woman life child world school state family student group country "
    "problem hand part place case week company system program question work government number night point "
    "home water room mother area money story fact month lot right study book eye job word business issue "
    "side kind head house service friend father power hour game line end member law car city community name "
    "president team minute idea kid body information back parent face others level office door health person "
    "art war history party result change morning reason research girl guy moment air teacher force "
    "education"
).split()


def schedule(systems: list[str], rates: list[float]) -> list[tuple[float, str]]:
    """(rate, system) in the order they run: rate by rate, the systems' order rotated by one per rate."""
    out = []
    for i, rate in enumerate(rates):
        k = i % len(systems) if systems else 0
        out += [(rate, s) for s in systems[k:] + systems[:k]]
    return out


def text_requests(args: argparse.Namespace, rate: float, seed: int, n: int) -> list[workload.Request]:
    """The mixed workload in words: Poisson arrivals, mostly short prompts, some long ones."""
    mixed = workload.Mixed(args.long_fraction, args.words, args.output_len, args.long_words, args.output_len)
    requests = mixed.requests(n, rate, seed)
    for r in requests:
        r.prompt = " ".join(WORDS[t % len(WORDS)] for t in r.prompt)
    return requests


def count(rate: float, seconds: float) -> int:
    return max(1, math.ceil(rate * seconds))


async def _load(
    peer: peers.Peer, url: str, model: str, requests: list[workload.Request], label: str, args: argparse.Namespace
) -> list[RequestRecord]:
    send = senders.HttpSender(url, args.timeout, model=model, ignore_eos=peer.ignore_eos)
    progress = ProgressLine(len(requests), label, enabled=not args.no_progress)
    try:
        return await run_open(requests, send, progress)
    finally:
        progress.close()
        await send.close()


def measure(peer: peers.Peer, launch: peers.Launch, rate: float, i: int, args: argparse.Namespace, out: Path) -> dict:
    """Start, warm up at `rate` (not counted), measure at `rate`, stop: {"records", "warmup"} or {"skipped"}."""
    running = peers.Running(peer, launch, out / "logs" / f"{peer.name}@{rate:g}.log")
    try:
        try:
            model = running.wait_ready(args.ready_timeout)
        except RuntimeError as e:
            return {"skipped": f"failed to start: {e}"}
        warm_up = text_requests(args, rate, args.seed + 1000 + i, count(rate, args.warmup_duration))
        warm = asyncio.run(_load(peer, running.url, model, warm_up, f"{peer.name} @ {rate:g} warm-up", args))
        measured = text_requests(args, rate, args.seed + i, count(rate, args.duration))
        records = asyncio.run(_load(peer, running.url, model, measured, f"{peer.name} @ {rate:g}", args))
        if running.proc.poll() is not None:
            return {"skipped": f"exited during the run: {running.last_line()}"}
        return {"records": records, "warmup": {"requests": len(warm), "errors": sum(r.error is not None for r in warm)}}
    finally:
        running.stop()


def _paths(args: argparse.Namespace) -> tuple[Path, Path | None]:
    """The converted model folder in pdserve's cache, and the GGUF for llama.cpp (None: --model has none)."""
    from pdserve.common import model_loader

    model_dir = model_loader.resolve(args.model).path
    if args.model is None:
        return model_dir, model_loader.default_gguf()
    return model_dir, Path(args.model) if args.model.endswith(".gguf") else None


def run_all(args: argparse.Namespace, out: Path) -> dict:
    os.environ.update(cpu_isa.environment(args.as_cpu))  # every system starts under it
    model_dir, gguf = _paths(args)
    skipped: dict[str, dict[str, str]] = {}
    runnable = []
    for name in args.systems:
        peer = peers.PEERS[name]
        if (reason := peers.missing(peer)) and args.auto_install:
            peers.install(peer)
            reason = peers.missing(peer)
        if reason is None and name == "llamacpp" and gguf is None:
            reason = "needs a .gguf --model"
        if reason:
            print(f"{name}: skipped: {reason}", flush=True)
            skipped[name] = {ALL_RATES: reason}
        else:
            runnable.append(name)
    runs: dict[str, dict[str, list]] = {n: {} for n in runnable}
    warmups: dict[str, dict[str, dict]] = {n: {} for n in runnable}
    order = schedule(runnable, args.rates)
    probe_env = cpu_isa.probe_shim(args.as_cpu)  # written once, read by every start
    for rate, name in order:
        i = args.rates.index(rate)
        peer = peers.PEERS[name]
        port = ports.free_run("127.0.0.1", args.port, PORTS_A_SYSTEM)  # a port of the last run may linger
        launch = peers.Launch(
            port,
            model_dir,
            gguf or model_dir,
            peers.python_of(peer),
            args.model,
            args.kv_cache_gib,
            len(os.sched_getaffinity(0)),
            probe_env,
        )
        print(f"{name} @ {rate:g} req/s: starting on port {port}", flush=True)
        result = measure(peer, launch, rate, i, args, out)
        if "skipped" in result:
            print(f"{name} @ {rate:g} req/s: skipped: {result['skipped']}", flush=True)
            skipped.setdefault(name, {})[f"{rate:g}"] = result["skipped"]
            continue
        runs[name][f"{rate:g}"] = [r.as_dict() for r in result["records"]]
        warmups[name][f"{rate:g}"] = result["warmup"]
    return {
        "rates": args.rates,
        "order": [[r, n] for r, n in order],
        "runs": runs,
        "warmups": warmups,
        "skipped": skipped,
    }


def report(doc: dict, args: argparse.Namespace, out: Path) -> str:
    """Summaries, capacity and ratios into doc; peer.json, peer.md and the plots into `out`."""
    slo = Slo(args.slo_ttft_ms, args.slo_tpot_ms)
    records = {
        n: {rate: [RequestRecord.from_dict(r) for r in rs] for rate, rs in by_rate.items()}
        for n, by_rate in doc["runs"].items()
    }
    doc["objectives"] = slo.as_dict()
    doc["summaries"] = peer_report.summaries(records, slo)
    doc["comparison"] = peer_report.comparison(doc["summaries"], doc["reference"])
    (out / "peer.json").write_text(json.dumps(doc, indent=1))
    text = peer_report.markdown(doc)
    (out / "peer.md").write_text(text)
    if any(records.values()):
        plots.write_all({n: {"runs": rs} for n, rs in records.items()}, slo, doc["summaries"], out, None)
    return text


def install(names: list[str]) -> int:
    for name in names:
        seconds = peers.install(peers.PEERS[name])
        venv = peers.peers_dir() / name
        size = subprocess.run(["du", "-sh", str(venv)], capture_output=True, text=True).stdout.split("\t")[0]
        print(f"{name}: installed in {seconds / 60:.1f} min, {size or '-'} in {venv}", flush=True)
    return 0


def main(args: argparse.Namespace) -> int:
    if args.install:
        return install(args.install)
    if args.quick:
        args.rates, args.duration, args.warmup_duration = [args.rates[0]], 10.0, 5.0
    if importlib.util.find_spec("matplotlib") is None:  # said before a long run, not after it
        print("pdserve bench peer: plots need matplotlib: pip install 'pdserve[bench]'", file=sys.stderr)
        return 2
    out = Path(args.out)
    if not args.from_json:
        shutil.rmtree(out / "logs", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    if args.from_json:
        doc = json.loads(Path(args.from_json).read_text())
    else:
        from pdserve.bench.limits import machine

        doc = {
            "machine": {**machine(), "as_cpu": args.as_cpu},
            "command": command_line(),
            "workload": describe(args),
            "reference": args.reference,
            "order_note": ORDER_NOTE,
            **run_all(args, out),
        }
    print(report(doc, args, out))
    logs = "" if args.from_json else f"; each peer's log in {out / 'logs'}"
    print(f"wrote {out / 'peer.json'}, {out / 'peer.md'} and plots{logs}")
    return 0


ORDER_NOTE = (
    "rate by rate, every system at each rate, the order rotated by one per rate; every (rate, system) "
    "a fresh start followed by an uncounted warm-up run at that rate"
)


def describe(args: argparse.Namespace) -> dict:
    return {
        "prompt": f"{args.words} words, {args.long_fraction:.0%} of them {args.long_words} words",
        "output_tokens": str(args.output_len),
        "ignore_eos": "asked of every server that takes it; not transformers serve (it refuses the field)",
        "duration_s": args.duration,
        "warmup_duration_s": args.warmup_duration,
        "seed": args.seed,
        "arrivals": "Poisson",
    }


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--install",
        nargs="+",
        choices=[n for n in SYSTEMS if peers.PEERS[n].install_steps and not peers.PEERS[n].shares],
        metavar="NAME",
        help="install these peers into ~/.cache/pdserve/peers/NAME and exit",
    )
    p.add_argument("--auto-install", action="store_true", help="install missing peers first (llamacpp: ~25 min)")
    p.add_argument("--systems", nargs="+", choices=SYSTEMS, default=DEFAULT_SYSTEMS)
    p.add_argument("--reference", choices=SYSTEMS, default="pdserve", help="ratios are to this system")
    p.add_argument("--rates", type=float, nargs="+", default=[0.5, 1.0, 2.0, 4.0], help="Poisson rates (req/s)")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of arrivals measured per rate")
    p.add_argument(
        "--warmup-duration",
        type=float,
        default=20.0,
        help="seconds of arrivals at the same rate after each start, not counted",
    )
    p.add_argument("--quick", action="store_true", help="a self-check: the first rate only, 10 s, 5 s warm-up")
    p.add_argument(
        "--words",
        type=workload.length_dist,
        default=workload.LengthDist("uniform", 20, 80),
        help="short prompts' length in words",
    )
    p.add_argument(
        "--long-words",
        type=workload.length_dist,
        default=workload.LengthDist("uniform", 600, 900),
        help="long prompts' length in words",
    )
    p.add_argument("--long-fraction", type=float, default=0.1, help="share of long prompts")
    p.add_argument(
        "--output-len",
        type=workload.length_dist,
        default=workload.LengthDist("uniform", 32, 64),
        help="output tokens (greedy, ignore_eos)",
    )
    p.add_argument("--slo-ttft-ms", type=float, default=3000.0, help="TTFT objective")
    p.add_argument("--slo-tpot-ms", type=float, default=150.0, help="TPOT objective")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=None, help="the model every system serves (default: pdserve's bundled SmolLM2)")
    p.add_argument("--kv-cache-gib", type=float, default=1.0, help="KV memory of pdserve's workers and vLLM")
    p.add_argument(
        "--port",
        type=int,
        default=54100,
        help="each system's HTTP port (pdserve: gRPC from +1), or the first free run of ports 100, 200, ... above it",
    )
    p.add_argument("--ready-timeout", type=float, default=600.0, help="seconds a system may take to start")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds a request may wait between chunks")
    p.add_argument("--out", default="benchmarks/results/peer", help="directory for peer.json, peer.md and plots")
    p.add_argument("--from-json", default=None, help="only redo the report and plots from this peer.json")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--as-cpu",
        choices=cpu_isa.CHOICES,
        default="native",
        help="avx2: every system on an AVX2-only CPU's code paths",
    )
