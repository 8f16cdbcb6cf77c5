"""`bench peer`'s numbers: per-system summaries, capacity, ratios to the reference system, and its markdown.

Capacity is the highest offered rate at which at least `share` (90%) of the
requests met both objectives; a system that met them at no rate has none.
"""

from __future__ import annotations

from pdserve.bench.metrics import RequestRecord, Slo, summarize

CAPACITY_SHARE = 0.9


def summaries(runs: dict[str, dict[str, list[RequestRecord]]], slo: Slo) -> dict[str, dict[str, dict]]:
    """system -> rate -> metrics.summarize() of its measured requests."""
    return {name: {rate: summarize(rs, slo) for rate, rs in by_rate.items()} for name, by_rate in runs.items()}


def capacity(by_rate: dict[str, dict], share: float = CAPACITY_SHARE) -> float | None:
    """The highest rate whose share of requests within the objectives is at least `share`."""
    passed = [float(rate) for rate, s in by_rate.items() if (s.get("slo_attainment") or 0.0) >= share]
    return max(passed, default=None)


def ratio(value: float | None, ref: float | None) -> float | None:
    """value / ref, or None where either is missing or ref is zero."""
    if value is None or not ref:
        return None
    return value / ref


def comparison(summ: dict[str, dict[str, dict]], reference: str) -> dict:
    """Per system: capacity and its ratio to the reference's; per rate: goodput, ITL p50 and TPOT p50 ratios."""
    ref = summ.get(reference, {})
    ref_capacity = capacity(ref) if ref else None
    out = {}
    for name, by_rate in summ.items():
        cap = capacity(by_rate)
        per_rate = {}
        for rate, s in by_rate.items():
            r = ref.get(rate)
            per_rate[rate] = {
                "goodput": ratio(s["goodput_rps"], r and r["goodput_rps"]),
                "itl_p50": ratio(s["itl_ms"]["p50"], r and r["itl_ms"]["p50"]),
                "tpot_p50": ratio(s["tpot_ms"]["p50"], r and r["tpot_ms"]["p50"]),
            }
        out[name] = {"capacity_rps": cap, "capacity_vs_reference": ratio(cap, ref_capacity), "by_rate": per_rate}
    return out


def _f(v, fmt: str = "{:.0f}") -> str:
    return "-" if v is None else fmt.format(v)


def _x(v) -> str:
    return _f(v, "{:.2f}x")


def _as_cpu(machine: dict) -> str:
    if machine.get("as_cpu", "native") == "native":
        return ""
    return f", every system held to an {machine['as_cpu']}-only CPU's code paths (bench/cpu_isa.py)"


def markdown(doc: dict) -> str:
    m, slo, ref = doc.get("machine", {}), doc["objectives"], doc["reference"]
    cmp, summ = doc["comparison"], doc["summaries"]
    lines = [
        "# pdserve beside other servers: the same model, the same open-loop load",
        "",
        f"Machine: {m.get('cpu', '?')}, {m.get('usable_cores', '?')} usable cores{_as_cpu(m)}. "
        f"Command: `{doc['command']}`",
        "",
        f"Workload: {doc['workload']}",
        "",
        f"Objectives: TTFT <= {_f(slo['ttft_ms'])} ms and TPOT <= {_f(slo['tpot_ms'])} ms; capacity is the "
        f"highest rate with >= {CAPACITY_SHARE:.0%} of requests within them. Ratios are to `{ref}`.",
        "",
        f"Order: {doc['order_note']}",
        "",
        "| system | capacity (req/s) | vs " + ref + " |",
        "|---|---|---|",
    ]
    for name, c in cmp.items():
        lines.append(
            f"| {name} | {_f(c['capacity_rps'], '{:g}') if c['capacity_rps'] else 'below every rate'} "
            f"| {_x(c['capacity_vs_reference'])} |"
        )
    lines += [
        "",
        "| system | rate (req/s) | within objectives | goodput (req/s) | output tok/s | tokens out / request "
        "| TTFT p50 / p99 (ms) | ITL p50 / p99 (ms) | TPOT p50 / p99 (ms) | errors "
        f"| goodput vs {ref} | ITL p50 vs {ref} |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, by_rate in summ.items():
        for rate, s in sorted(by_rate.items(), key=lambda kv: float(kv[0])):
            r = cmp[name]["by_rate"][rate]
            per_req = s["output_tokens_per_s"] * s["duration_s"] / s["completed"] if s["completed"] else None
            lines.append(
                f"| {name} | {rate} | {100 * (s['slo_attainment'] or 0):.0f}% | {s['goodput_rps']:.2f} "
                f"| {s['output_tokens_per_s']:.1f} | {_f(per_req, '{:.1f}')} "
                f"| {_f(s['ttft_ms']['p50'])} / {_f(s['ttft_ms']['p99'])} "
                f"| {_f(s['itl_ms']['p50'])} / {_f(s['itl_ms']['p99'])} "
                f"| {_f(s['tpot_ms']['p50'])} / {_f(s['tpot_ms']['p99'])} "
                f"| {sum(s['errors'].values()) or ''} | {_x(r['goodput'])} | {_x(r['itl_p50'])} |"
            )
    skipped = skipped_lines(doc["skipped"])
    if skipped:
        lines += ["", "Skipped:", *skipped]
    return "\n".join(lines) + "\n"


def skipped_lines(skipped: dict[str, dict[str, str]]) -> list[str]:
    """One line per system and reason: `- vllm (all rates): not installed: ...`; never left out."""
    out = []
    for name, by_rate in skipped.items():
        reasons: dict[str, list[str]] = {}
        for rate, reason in by_rate.items():
            reasons.setdefault(reason, []).append(rate)
        for reason, rates in reasons.items():
            where = "all rates" if rates == ["*"] else "at " + ", ".join(rates) + " req/s"
            out.append(f"- {name} ({where}): {reason}")
    return out
