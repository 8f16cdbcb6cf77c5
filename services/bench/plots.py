"""`bench compare`'s plots (matplotlib, the `[bench]` extra), one PNG each.

goodput.png (goodput and p99 ITL against the rate), itl_cdf.png (inter-token latencies at one rate) and
timeline.png (each request at one rate, its decode stalls in red).
What each shows: docs/benchmarks.md ("Colocated vs disaggregated").
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pdserve.bench.metrics import RequestRecord, Slo

COLORS = {"colocated": "tab:red", "colocated-chunked": "tab:orange", "disaggregated": "tab:blue"}


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("plots need matplotlib: pip install 'pdserve[bench]'") from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def goodput(summaries: dict, slo: Slo, path: Path) -> None:
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for mode, by_rate in summaries.items():
        rates = sorted((float(r), s) for r, s in by_rate.items() if r != "idle")
        x = [r for r, _ in rates]
        ax1.plot(x, [s["goodput_rps"] for _, s in rates], "o-", color=COLORS.get(mode), label=mode)
        ax2.plot(x, [s["itl_ms"]["p99"] or np.nan for _, s in rates], "o-", color=COLORS.get(mode), label=mode)
    top = max((float(r) for by_rate in summaries.values() for r in by_rate if r != "idle"), default=1.0)
    ax1.plot([0, top], [0, top], ":", color="grey", label="offered rate")
    ax1.set_xlim(0, top * 1.05)
    ax1.set_ylim(0, top * 1.05)
    ax1.set(xlabel="offered rate (req/s)", ylabel="goodput (req/s within objectives)", title="Goodput")
    ax2.set(
        xlabel="offered rate (req/s)",
        ylabel="p99 inter-token latency (ms)",
        yscale="log",
        title="p99 inter-token latency",
    )
    if np.isfinite(slo.tpot_ms):
        ax2.axhline(slo.tpot_ms, ls="--", color="grey", label=f"TPOT objective {slo.tpot_ms:.0f} ms")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def itl_cdf(runs: dict[str, list[RequestRecord]], slo: Slo, rate: str, path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for mode, records in runs.items():
        itls = np.sort([x for r in records if r.ok for x in r.itls_ms])
        if len(itls):
            ax.plot(
                itls,
                np.arange(1, len(itls) + 1) / len(itls),
                color=COLORS.get(mode),
                label=f"{mode} (p99 {np.percentile(itls, 99):.0f} ms)",
            )
    if np.isfinite(slo.tpot_ms):
        ax.axvline(slo.tpot_ms, ls="--", color="grey", label=f"TPOT objective {slo.tpot_ms:.0f} ms")
    ax.set(
        xscale="log",
        xlabel="inter-token latency (ms)",
        ylabel="fraction of gaps",
        title=f"Inter-token latency CDF at {rate} req/s",
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def timeline(runs: dict[str, list[RequestRecord]], slo: Slo, rate: str, path: Path) -> None:
    plt = _pyplot()
    from matplotlib.lines import Line2D

    fig, axes = plt.subplots(len(runs), 1, figsize=(11, 1.5 + 2.4 * len(runs)), sharex=True, squeeze=False)
    stall = slo.tpot_ms if np.isfinite(slo.tpot_ms) else None
    for ax, (mode, records) in zip(axes[:, 0], runs.items()):
        limit = stall or 5 * float(np.median([x for r in records for x in r.itls_ms] or [1.0]))
        for y, r in enumerate(sorted(records, key=lambda r: r.sent_s)):
            if not r.token_times:  # failed before its first token
                ax.plot([r.sent_s, r.done_s], [y, y], color="black", lw=1, ls="--")
                ax.plot([r.done_s], [y], "x", color="black")
                continue
            ax.plot([r.sent_s, r.token_times[0]], [y, y], color="tab:purple" if r.kind == "long" else "silver", lw=2)
            ax.plot([r.token_times[0], r.token_times[-1]], [y, y], color="tab:blue", lw=2)
            for a, b in zip(r.token_times, r.token_times[1:]):
                if (b - a) * 1e3 > limit:
                    ax.plot([a, b], [y, y], color="red", lw=3)
            if r.error:
                ax.plot([r.done_s], [y], "x", color="black")
        ax.set_title(f"{mode} at {rate} req/s", fontsize=10)
        ax.set_ylabel("request")
    handles = [
        Line2D([], [], color="silver", lw=2, label="waiting for the first token"),
        Line2D([], [], color="tab:purple", lw=2, label="... a long prompt"),
        Line2D([], [], color="tab:blue", lw=2, label="decoding"),
        Line2D([], [], color="red", lw=3, label=f"gap between tokens > {limit:.0f} ms (stall)"),
        Line2D([], [], color="black", ls="--", marker="x", label="failed"),
    ]
    fig.legend(handles=handles, loc="upper center", ncol=5, fontsize=8, frameon=False)
    axes[-1, 0].set_xlabel("time since the run started (s)")
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_all(records: dict, slo: Slo, summaries: dict, out: Path, plot_rate: float | None) -> list[Path]:
    rates = sorted({r for d in records.values() for r in d["runs"]}, key=float)
    if not rates:
        return []
    rate = f"{plot_rate:g}" if plot_rate is not None else rates[-1]
    runs = {m: d["runs"][rate] for m, d in records.items() if rate in d["runs"]}
    paths = [out / "goodput.png", out / "itl_cdf.png", out / "timeline.png"]
    goodput(summaries, slo, paths[0])
    itl_cdf(runs, slo, rate, paths[1])
    timeline(runs, slo, rate, paths[2])
    return paths
