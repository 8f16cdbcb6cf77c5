"""Engines of two or more dtypes side by side: decode steps and a prefill, alternated in one process.

    .venv/bin/python benchmarks/dtypes.py [--dtypes float32 bfloat16] [--as-cpu avx2] [--json FILE]

One engine per dtype on the bundled model, each step of one taking turns with the same step of the
others (and a 256 MiB read, the memory's rate at that moment), so the host's drift is shared:
- a decode step of 1 and of 32 sequences at context 512 (medians of 30 and 12);
- a prefill of 1,024 new tokens (median of 5).
`--as-cpu avx2` runs it on an AVX2-only CPU's code paths (bench/cpu_isa.py). docs/engine.md
("bf16 without AVX512_BF16") has figures.
"""

from __future__ import annotations

import argparse
import json
import statistics

from pdserve.bench import cpu_isa


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--as-cpu", choices=cpu_isa.CHOICES, default="native")
    ap.add_argument("--json", help="also write the medians (ms) here")
    args = ap.parse_args()
    cpu_isa.reexec_as(args.as_cpu)

    from pdserve.bench.engine_bench import drain, prefill_all, prefill_once, synthetic_prompt
    from pdserve.bench.limits import alternated_times, cpu_name, read_probe
    from pdserve.common import model_loader
    from pdserve.common.engine.config import EngineConfig
    from pdserve.common.engine.engine import LLMEngine

    ref = model_loader.resolve(None)
    engines = {}
    for dtype in args.dtypes:
        model, tokenizer = model_loader.load(ref, dtype=dtype)
        config = EngineConfig(dtype=dtype, num_kv_blocks=1200, max_num_batched_tokens=1024, enable_prefix_caching=False)
        engines[dtype] = LLMEngine(config, model, tokenizer, ref)
        engines[dtype].pool.tensor.zero_()  # resident pages, as in a server that has run a while
        print(f"{dtype}: {engines[dtype].runner.describe()}", flush=True)
    print(f"{cpu_name()}, as {args.as_cpu}", flush=True)
    read, nbytes, _ = read_probe()
    results: dict = {"cpu": cpu_name(), "as_cpu": args.as_cpu}
    for seqs, steps in ((1, 30), (32, 12)):
        for engine in engines.values():
            prefill_all(engine, [synthetic_prompt(511, s) for s in range(seqs)], steps + 10)
        times = alternated_times({**{d: e.step for d, e in engines.items()}, "read": read}, steps)
        for engine in engines.values():
            drain(engine)
        medians = {d: statistics.median(ts) * 1e3 for d, ts in times.items()}
        results[f"decode_{seqs}"] = medians
        cells = ", ".join(f"{d} {medians[d]:.2f} ms" for d in engines)
        print(f"decode step, {seqs} at 512: {cells} (read {nbytes / medians['read'] / 1e6:.0f} GB/s)", flush=True)
    times = alternated_times({d: (lambda e=e: prefill_once(e, 1024)) for d, e in engines.items()}, 5)
    results["prefill_1024"] = {d: statistics.median(ts) * 1e3 for d, ts in times.items()}
    print("prefill, 1,024 tokens: " + ", ".join(f"{d} {ms:.0f} ms" for d, ms in results["prefill_1024"].items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
