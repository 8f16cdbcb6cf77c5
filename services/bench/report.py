"""`bench compare`'s numbers: objectives from the idle run, summaries, goals, a markdown report.

TTFT <= f_ttft x (a + b x prompt tokens), a line fitted over the idle requests; TPOT <= f_tpot x their median.
Why per prompt length: docs/benchmarks.md ("Colocated vs disaggregated").
"""

from __future__ import annotations

import statistics

import numpy as np

from pdserve.bench.metrics import RequestRecord, Slo, summarize

Records = dict[str, dict]  # mode -> {"idle": [RequestRecord], "runs": {rate: [RequestRecord]}}


def idle_line(idle: list[RequestRecord]) -> tuple[float, float]:
    """(intercept ms, ms per prompt token) of the idle TTFTs, neither negative."""
    ok = [r for r in idle if r.ok]
    if not ok:
        raise ValueError("no idle request succeeded: no objectives can be derived")
    x = np.array([r.prompt_tokens for r in ok], dtype=float)
    y = np.array([r.ttft_ms for r in ok])
    if len(set(x)) < 2:
        return float(np.median(y)), 0.0
    b, a = np.polyfit(x, y, 1)
    if b < 0:  # noise on a narrow range of lengths
        return float(np.median(y)), 0.0
    if a < 0:
        return 0.0, float((x @ y) / (x @ x))
    return float(a), float(b)


def objectives(records: Records, slo_from: str, ttft_factor: float, tpot_factor: float) -> dict:
    mode = slo_from if slo_from in records else next(iter(records))
    idle = records[mode]["idle"]
    a, b = idle_line(idle)
    tpots = [r.tpot_ms for r in idle if r.ok and r.tpot_ms is not None]
    tpot = statistics.median(tpots) if tpots else float("inf")
    slo = Slo(ttft_ms=ttft_factor * a, tpot_ms=tpot_factor * tpot, ttft_ms_per_token=ttft_factor * b)
    return {
        "slo": slo,
        "derived_from": mode,
        "idle_ttft_ms": {"intercept": a, "per_prompt_token": b},
        "idle_tpot_ms": tpot,
        "factors": {"ttft": ttft_factor, "tpot": tpot_factor},
        "statement": f"TTFT <= {ttft_factor:g} x idle TTFT ({a:.0f} ms + {b:.3f} ms/prompt token) and "
        f"TPOT <= {tpot_factor:g} x idle TPOT ({tpot:.1f} ms), idle run of {mode}",
    }


def summaries(records: Records, slo: Slo) -> dict:
    return {
        m: {"idle": summarize(d["idle"], slo), **{rate: summarize(rs, slo) for rate, rs in d["runs"].items()}}
        for m, d in records.items()
    }


def goals(s: dict) -> dict:
    """Issue #6's goals at each rate all three modes ran."""
    need = ("colocated", "colocated-chunked", "disaggregated")
    if not all(m in s for m in need):
        return {}
    out = {}
    for rate in [r for r in s["disaggregated"] if r != "idle" and all(r in s[m] for m in need)]:
        itl = {m: s[m][rate]["itl_ms"]["p99"] for m in need}
        good = {m: s[m][rate]["goodput_rps"] for m in need}
        itl_ratio = itl["disaggregated"] / itl["colocated"] if itl["disaggregated"] and itl["colocated"] else None
        good_ratio = good["disaggregated"] / good["colocated"] if good["colocated"] else None
        out[rate] = {
            "p99_itl_ms": itl,
            "goodput_rps": good,
            "p99_itl_disaggregated_over_colocated": itl_ratio,
            "p99_itl_goal_met": itl_ratio is not None
            and itl_ratio <= 0.2
            and itl["disaggregated"] < itl["colocated-chunked"],
            "goodput_disaggregated_over_colocated": good_ratio,
            "goodput_goal_met": (good_ratio is not None and good_ratio >= 2.0)
            or (not good["colocated"] and good["disaggregated"] > 0),
        }
    return out


def _f(v, fmt: str = "{:.0f}") -> str:
    return "-" if v is None else fmt.format(v)


def markdown(doc: dict) -> str:
    obj, s = doc["objectives"], doc["summaries"]
    m = doc.get("machine", {})
    lines = [
        "# Disaggregated vs colocated: goodput under latency objectives",
        "",
        f"Machine: {m.get('cpu', '?')}, {m.get('usable_cores', '?')} usable cores. Command: `{doc['command']}`",
        "",
        f"Workload: {doc['workload']}",
        "",
        f"Objectives: {obj['statement']}.",
        "",
        "| mode | rate (req/s) | goodput (req/s) | within objectives | throughput (req/s) | output tok/s "
        "| TTFT p50 / p99 (ms) | ITL p50 / p99 / p99.9 / max (ms) | TPOT p50 / p99 (ms) | errors |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for mode, by_rate in s.items():
        for rate, x in by_rate.items():
            if rate == "idle":
                continue
            lines.append(
                f"| {mode} | {rate} | {x['goodput_rps']:.2f} | {100 * (x['slo_attainment'] or 0):.0f}% "
                f"| {x['throughput_rps']:.2f} | {x['output_tokens_per_s']:.1f} "
                f"| {_f(x['ttft_ms']['p50'])} / {_f(x['ttft_ms']['p99'])} "
                f"| {_f(x['itl_ms']['p50'])} / {_f(x['itl_ms']['p99'])} / {_f(x['itl_ms'].get('p99.9'))} "
                f"/ {_f(x['itl_ms']['max'])} "
                f"| {_f(x['tpot_ms']['p50'])} / {_f(x['tpot_ms']['p99'])} "
                f"| {sum(x['errors'].values()) or ''} |"
            )
    if doc.get("goals"):
        lines += [
            "",
            "| rate | p99 ITL disaggregated / colocated (goal <= 0.2, and below chunked) | met "
            "| goodput disaggregated / colocated (goal >= 2) | met |",
            "|---|---|---|---|---|",
        ]
        for rate, g in doc["goals"].items():
            lines.append(
                f"| {rate} | {_f(g['p99_itl_disaggregated_over_colocated'], '{:.2f}')} "
                f"| {'yes' if g['p99_itl_goal_met'] else 'no'} "
                f"| {_f(g['goodput_disaggregated_over_colocated'], '{:.2f}')} "
                f"| {'yes' if g['goodput_goal_met'] else 'no'} |"
            )
    setup = [
        f"{mode}: per-step token budget {d['max_num_batched_tokens']}, worker cores {d['cores']}"
        for mode, d in doc["modes"].items()
    ]
    lines += ["", "Setup: " + "; ".join(setup) + f"; router policy --local-prefill {doc.get('local_prefill')}.", ""]
    return "\n".join(lines)
