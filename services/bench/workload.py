"""What a load run sends, and when: arrival times, prompts, output lengths.

Synthetic lengths (`fixed:N`, `uniform:LO:HI`, `lognormal:MEDIAN:SIGMA[:MAX]`) with Poisson arrivals, the
`mixed` preset, or a Mooncake trace (mooncake.py); prompts are token ids, so every length is exact.
Presets and why: docs/benchmarks.md ("Load generator").
"""

from __future__ import annotations

import argparse
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from pdserve.bench.mooncake import BLOCK_TOKENS, PrefixBlocks, TraceError, TraceRecord, read_trace

TOKEN_LOW, TOKEN_HIGH = 100, 32000  # ordinary tokens in every Llama-family vocabulary; no special ids


@dataclass
class Request:
    index: int
    arrival_s: float  # from the start of the run
    prompt: Sequence[int]  # token ids (the planner's simulations: only its length, e.g. a range)
    max_tokens: int  # generated with ignore_eos, so exactly this many
    kind: str = ""  # the mixed preset's class ("short", "long"); "" otherwise


@dataclass(frozen=True)
class LengthDist:
    """A token-length distribution, parsed from `fixed:N`, `N`, `uniform:LO:HI`
    or `lognormal:MEDIAN:SIGMA[:MAX]`."""

    kind: str
    a: float
    b: float = 0.0
    cap: int = 1 << 20

    @classmethod
    def parse(cls, spec: str) -> LengthDist:
        kind, *raw = spec.split(":") if ":" in spec else ("fixed", spec)
        try:
            nums = [float(x) for x in raw]
        except ValueError:
            raise ValueError(f"bad length distribution {spec!r}: numbers expected after the kind") from None
        if kind == "fixed" and len(nums) == 1 and nums[0] >= 1:
            return cls("fixed", nums[0])
        if kind == "uniform" and len(nums) == 2 and 1 <= nums[0] <= nums[1]:
            return cls("uniform", nums[0], nums[1])
        if kind == "lognormal" and len(nums) in (2, 3) and nums[0] >= 1 and nums[1] >= 0:
            return cls("lognormal", nums[0], nums[1], int(nums[2]) if len(nums) == 3 else 1 << 20)
        raise ValueError(
            f"bad length distribution {spec!r}: use fixed:N, uniform:LO:HI or lognormal:MEDIAN:SIGMA[:MAX]"
        )

    def sample(self, rng: random.Random) -> int:
        if self.kind == "fixed":
            return int(self.a)
        if self.kind == "uniform":
            return rng.randint(int(self.a), int(self.b))
        return max(1, min(self.cap, round(self.a * math.exp(self.b * rng.gauss(0.0, 1.0)))))

    def __str__(self) -> str:
        return {
            "fixed": f"fixed:{self.a:g}",
            "uniform": f"uniform:{self.a:g}:{self.b:g}",
            "lognormal": f"lognormal:{self.a:g}:{self.b:g}:{self.cap}",
        }[self.kind]


SYNTHETIC_PROMPT, SYNTHETIC_OUTPUT = LengthDist("uniform", 64, 256), LengthDist("uniform", 32, 128)


def poisson_arrivals(rate: float, n: int, rng: random.Random) -> list[float]:
    """Arrival times of a Poisson process at `rate` per second, the first at 0
    (rate inf: all at once)."""
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate) if math.isfinite(rate) else 0.0
    return out


def random_tokens(n: int, rng: random.Random) -> list[int]:
    return [rng.randrange(TOKEN_LOW, TOKEN_HIGH) for _ in range(n)]


def synthetic(n: int, rate: float, prompt: LengthDist, output: LengthDist, seed: int = 0) -> list[Request]:
    """Fresh random prompts (no two share a prefix block), Poisson arrivals."""
    rng = random.Random(seed)
    return [
        Request(i, t, random_tokens(prompt.sample(rng), rng), output.sample(rng))
        for i, t in enumerate(poisson_arrivals(rate, n, rng))
    ]


@dataclass(frozen=True)
class Mixed:
    """Short requests that decode for a while; long prompts arriving among them."""

    long_fraction: float = 0.2
    short_prompt: LengthDist = LengthDist("uniform", 32, 128)
    short_output: LengthDist = LengthDist("uniform", 64, 128)
    long_prompt: LengthDist = LengthDist("uniform", 1000, 2000)
    long_output: LengthDist = LengthDist("fixed", 16)

    def requests(self, n: int, rate: float, seed: int = 0) -> list[Request]:
        rng = random.Random(seed)
        out = []
        for i, t in enumerate(poisson_arrivals(rate, n, rng)):
            kind = "long" if rng.random() < self.long_fraction else "short"
            p, o = (self.long_prompt, self.long_output) if kind == "long" else (self.short_prompt, self.short_output)
            out.append(Request(i, t, random_tokens(p.sample(rng), rng), o.sample(rng), kind))
        return out


def from_trace(
    records: list[TraceRecord],
    *,
    rate: float | None = None,
    speed: float = 1.0,
    block_tokens: int = BLOCK_TOKENS,
    max_prompt: int | None = None,
    max_output: int | None = None,
    seed: int = 0,
) -> list[Request]:
    """Requests of a trace: at its own timestamps (divided by `speed`), or at
    Poisson times when `rate` is given. Prompts and outputs longer than
    max_prompt / max_output (the model's context) are cut."""
    blocks = PrefixBlocks(block_tokens, seed, (TOKEN_LOW, TOKEN_HIGH))
    if rate is not None:
        times = poisson_arrivals(rate, len(records), random.Random(seed))
    else:
        t0 = min((r.timestamp_ms for r in records), default=0.0)
        times = [(r.timestamp_ms - t0) / 1000.0 / speed for r in records]
    out = []
    for i, (r, t) in enumerate(zip(records, times)):
        prompt = blocks.prompt(r, i)[:max_prompt]
        out.append(Request(i, t, prompt, max(1, min(r.output_length, max_output or r.output_length))))
    return sorted(out, key=lambda q: q.arrival_s)


# -- command line -----------------------------------------------------------------


def length_dist(spec: str) -> LengthDist:
    try:
        return LengthDist.parse(spec)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_args(p: argparse.ArgumentParser, *, default_workload: str = "synthetic") -> None:
    g = p.add_argument_group("workload")
    g.add_argument(
        "--workload",
        choices=["synthetic", "mixed", "trace"],
        default=default_workload,
        help="trace: --trace FILE (Mooncake JSONL)",
    )
    g.add_argument("--trace", default=None, help="Mooncake-format JSONL trace (implies --workload trace)")
    g.add_argument("--trace-speed", type=float, default=1.0, help="replay the trace this many times faster")
    g.add_argument("--trace-block-tokens", type=int, default=BLOCK_TOKENS, help="tokens per hash id")
    g.add_argument(
        "--arrivals",
        choices=["poisson", "trace"],
        default=None,
        help="default: the trace's timestamps with --trace, else Poisson at --rate",
    )
    g.add_argument("--rate", type=float, default=1.0, help="requests/s (Poisson arrivals; inf: all at once)")
    g.add_argument("--num-requests", type=int, default=100, help="requests to send (a trace: its first N)")
    g.add_argument(
        "--prompt-len",
        type=length_dist,
        default=None,
        help=f"prompt tokens: fixed:N, uniform:LO:HI, lognormal:MEDIAN:SIGMA[:MAX] "
        f"(default {SYNTHETIC_PROMPT}; mixed: the short prompts, default {Mixed.short_prompt})",
    )
    g.add_argument(
        "--output-len",
        type=length_dist,
        default=None,
        help=f"output tokens, same forms (default {SYNTHETIC_OUTPUT}; "
        f"mixed: the short requests', default {Mixed.short_output})",
    )
    g.add_argument("--long-fraction", type=float, default=Mixed.long_fraction, help="mixed: share of long prompts")
    g.add_argument("--long-prompt-len", type=length_dist, default=Mixed.long_prompt, help="mixed: long prompts")
    g.add_argument(
        "--long-output-len", type=length_dist, default=Mixed.long_output, help="mixed: long requests' outputs"
    )
    g.add_argument("--max-prompt-tokens", type=int, default=None, help="cut longer trace prompts (the context window)")
    g.add_argument("--max-output-tokens", type=int, default=None, help="cut longer trace outputs")
    g.add_argument("--seed", type=int, default=0)


def from_args(
    args: argparse.Namespace, *, rate: float | None = None, seed: int | None = None, n: int | None = None
) -> list[Request]:
    """The workload the arguments describe (rate, seed, n override theirs: a sweep)."""
    rate = args.rate if rate is None else rate
    seed = args.seed if seed is None else seed
    n = args.num_requests if n is None else n
    if args.trace or args.workload == "trace":
        if not args.trace:
            raise TraceError("--workload trace needs --trace FILE")
        records = read_trace(args.trace)[:n]
        poisson = args.arrivals == "poisson"
        return from_trace(
            records,
            rate=rate if poisson else None,
            speed=args.trace_speed,
            block_tokens=args.trace_block_tokens,
            max_prompt=args.max_prompt_tokens,
            max_output=args.max_output_tokens,
            seed=seed,
        )
    prompt, output = _lengths(args)
    if args.workload == "mixed":
        preset = Mixed(args.long_fraction, prompt, output, args.long_prompt_len, args.long_output_len)
        return preset.requests(n, rate, seed)
    return synthetic(n, rate, prompt, output, seed)


def _lengths(args: argparse.Namespace) -> tuple[LengthDist, LengthDist]:
    mixed = args.workload == "mixed"
    return (
        args.prompt_len or (Mixed.short_prompt if mixed else SYNTHETIC_PROMPT),
        args.output_len or (Mixed.short_output if mixed else SYNTHETIC_OUTPUT),
    )


def describe(args: argparse.Namespace) -> dict:
    """The workload's parameters, for the results file."""
    keys = ["workload", "trace", "trace_speed", "arrivals", "rate", "num_requests", "seed"]
    out = {k: getattr(args, k) for k in keys}
    if args.trace:
        return out
    prompt, output = _lengths(args)
    out.update(prompt_len=str(prompt), output_len=str(output))
    if args.workload == "mixed":
        out.update(
            long_fraction=args.long_fraction,
            long_prompt_len=str(args.long_prompt_len),
            long_output_len=str(args.long_output_len),
        )
    return out
