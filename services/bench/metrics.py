"""Per-request timings of a load run, and the statistics over them.

Times are seconds from the run's start, taken by the client as each message with tokens arrives; from them
TTFT, inter-token latency, TPOT, end-to-end, and goodput (requests/s that met both objectives, `Slo`).
Definitions: docs/benchmarks.md ("Load generator": "Measured per request").
"""

from __future__ import annotations

import array
import hashlib
import math
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass
class RequestRecord:
    index: int
    prompt_tokens: int
    max_tokens: int
    scheduled_s: float  # arrival time the workload asked for
    sent_s: float = 0.0  # when the generator actually sent it
    token_times: list[float] = field(default_factory=list)  # each message that carried tokens
    output_tokens: int = 0
    done_s: float = 0.0
    error: str | None = None  # gRPC status name, HTTP_<status>, or an exception's type
    kind: str = ""
    # A digest of the output token ids, where the sender sees them: two runs' greedy outputs compare by it.
    output_digest: str = ""
    _ids: list[int] = field(default_factory=list, repr=False)

    def tokens(self, t: float, n: int, ids=()) -> None:
        self.token_times.append(t)
        self.output_tokens += n
        if ids:
            self._ids.extend(ids)
            self.output_digest = hashlib.blake2b(array.array("q", self._ids).tobytes(), digest_size=8).hexdigest()

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.token_times)

    @property
    def ttft_ms(self) -> float | None:
        return (self.token_times[0] - self.sent_s) * 1e3 if self.token_times else None

    @property
    def itls_ms(self) -> list[float]:
        t = self.token_times
        return [(b - a) * 1e3 for a, b in zip(t, t[1:])]

    @property
    def tpot_ms(self) -> float | None:
        if len(self.token_times) < 2 or self.output_tokens < 2:
            return None
        return (self.token_times[-1] - self.token_times[0]) * 1e3 / (self.output_tokens - 1)

    @property
    def e2e_ms(self) -> float:
        return (self.done_s - self.sent_s) * 1e3

    def as_dict(self) -> dict:
        d = asdict(self)
        del d["_ids"]
        d["token_times"] = [round(t, 6) for t in self.token_times]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> RequestRecord:
        return cls(**d)


@dataclass(frozen=True)
class Slo:
    """Latency objectives. The TTFT limit may grow with the prompt
    (ttft_ms + ttft_ms_per_token * prompt tokens): an idle long prompt takes
    longer to its first token than a short one, on any system."""

    ttft_ms: float = math.inf
    tpot_ms: float = math.inf
    ttft_ms_per_token: float = 0.0

    def ttft_limit_ms(self, prompt_tokens: int) -> float:
        return self.ttft_ms + self.ttft_ms_per_token * prompt_tokens

    def met(self, r: RequestRecord) -> bool:
        tpot = r.tpot_ms
        return r.ok and r.ttft_ms <= self.ttft_limit_ms(r.prompt_tokens) and (tpot is None or tpot <= self.tpot_ms)

    def as_dict(self) -> dict:
        return {k: (None if math.isinf(v) else v) for k, v in asdict(self).items()}


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "p99": None, "p99.9": None, "mean": None, "max": None}
    a = np.asarray(values, dtype=float)
    p50, p90, p99, p999 = np.percentile(a, [50, 90, 99, 99.9])
    return {
        "p50": float(p50),
        "p90": float(p90),
        "p99": float(p99),
        "p99.9": float(p999),
        "mean": float(a.mean()),
        "max": float(a.max()),
    }


def _latencies(records: list[RequestRecord]) -> dict:
    ok = [r for r in records if r.ok]
    return {
        "ttft_ms": percentiles([r.ttft_ms for r in ok]),
        "itl_ms": percentiles([x for r in ok for x in r.itls_ms]),
        "tpot_ms": percentiles([r.tpot_ms for r in ok if r.tpot_ms is not None]),
        "e2e_ms": percentiles([r.e2e_ms for r in ok]),
    }


def summarize(records: list[RequestRecord], slo: Slo = Slo()) -> dict:
    """Throughput and goodput over the run's span (first arrival to last
    completion), latency percentiles, errors by code, and how far the
    generator fell behind its own schedule (send lag)."""
    ok = [r for r in records if r.ok]
    span = (
        max((r.done_s for r in records), default=0.0) - min((r.scheduled_s for r in records), default=0.0)
    ) or math.nan
    met = sum(slo.met(r) for r in records)
    out = {
        "requests": len(records),
        "completed": len(ok),
        "errors": dict(Counter(r.error for r in records if r.error)),
        "duration_s": span,
        "throughput_rps": len(ok) / span,
        "output_tokens_per_s": sum(r.output_tokens for r in ok) / span,
        "goodput_rps": met / span,
        "slo_attainment": met / len(records) if records else None,
        "slo": slo.as_dict(),
        **_latencies(records),
        "send_lag_ms": percentiles([(r.sent_s - r.scheduled_s) * 1e3 for r in records]),
    }
    kinds = sorted({r.kind for r in records if r.kind})
    if len(kinds) > 1:
        out["by_kind"] = {
            k: {"requests": sum(r.kind == k for r in records), **_latencies([r for r in records if r.kind == k])}
            for k in kinds
        }
    return out


def format_summary(s: dict) -> str:
    """A few lines for the terminal."""

    def row(name: str, p: dict) -> str:
        if p["p50"] is None:
            return f"  {name:<5} -"
        return f"  {name:<5} p50 {p['p50']:8.1f}  p90 {p['p90']:8.1f}  p99 {p['p99']:8.1f} ms"

    slo = s["slo"]
    lines = [
        f"{s['completed']}/{s['requests']} completed in {s['duration_s']:.1f} s; "
        f"{s['throughput_rps']:.2f} req/s, {s['output_tokens_per_s']:.1f} output tok/s; "
        f"goodput {s['goodput_rps']:.2f} req/s ({100 * (s['slo_attainment'] or 0):.0f}% within "
        f"TTFT {_limit(slo['ttft_ms'])}{'+%.3g/token' % slo['ttft_ms_per_token'] if slo['ttft_ms_per_token'] else ''}"
        f" ms, TPOT {_limit(slo['tpot_ms'])} ms)"
    ]
    lines += [row(n, s[k]) for n, k in (("TTFT", "ttft_ms"), ("ITL", "itl_ms"), ("TPOT", "tpot_ms"), ("E2E", "e2e_ms"))]
    if s["errors"]:
        lines.append("  errors: " + ", ".join(f"{k} x{v}" for k, v in sorted(s["errors"].items())))
    lag = s["send_lag_ms"]
    if lag["p99"] is not None and lag["p99"] > 10:
        lines.append(f"  note: the generator sent late (send lag p99 {lag['p99']:.0f} ms): it lacked CPU")
    return "\n".join(lines)


def _limit(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"
