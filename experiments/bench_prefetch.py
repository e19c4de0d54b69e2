"""What the kernels' next-row prefetch buys and how far ahead it should reach: every format
and kernel with it off, at fixed distances and at the default, interleaved in one loop.

    python experiments/bench_prefetch.py           # ~2 min on 2 cores
    python experiments/bench_prefetch.py --reps 41 --threads 1 2

Llama-3.2-3B MLP shapes, batch 1, random weights and active sets. ``_fast._mlp._set_prefetch``
sets how many row pairs (gate/up pass) or groups of four (down pass) ahead the kernels
prefetch; 0 turns the prefetch off, -1 restores the default (about 192 KiB ahead: 4 pairs of
fp32 rows on these shapes, 8 of bf16, 16 of int8). Each call sets the knob, then runs the kernel, so the
settings are timed rep by rep, in a new random order every rep (in a fixed rotation each
setting would always follow the one before on the same weights and find them warmer, and
"off", first, never would; that overstated the gains in this file's earlier runs). Writes
``experiments/results/bench_prefetch.{csv,md}``: medians with quartiles, and the speedup of
each setting over no prefetch (ratio of medians). The default (``PF_BYTES`` in
``_mlp.pyx``) is read off this table.
"""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd

from sparselab import _fast
from sparselab._fast import _mlp
from sparselab._version import versions
from sparselab.evaluation.kernel_bench import knob_sweep, run_sweep
from sparselab.evaluation.suite_report import machine_info

RESULTS = Path(__file__).resolve().parent / "results"
FORMATS = ("float32", "bfloat16", "int8_b32", "int8_row")
AHEAD = (0, 1, 2, 4, 8, 16, 32, -1)  # pairs ahead; 0: off, -1: the default (about 192 KiB ahead)


def measure(shape: str, densities, threads, reps: int, seed: int = 0) -> pd.DataFrame:
    df = pd.DataFrame(knob_sweep(shape, densities, threads, reps, FORMATS, _mlp._set_prefetch,
                                 AHEAD, -1, "ahead", seed))  # -1: the shipped default
    off = df[df.ahead == 0].set_index(["threads", "density", "format", "kernel"]).median_ms
    key = ["threads", "density", "format", "kernel"]
    df["speedup_vs_off"] = (df.set_index(key).index.map(off) / df.median_ms).round(3)
    return df


def markdown(df: pd.DataFrame, args) -> str:
    table = df.pivot_table(index=["threads", "density", "format", "kernel"], columns="ahead",
                           values="speedup_vs_off").reset_index()
    # the fixed distances in order, then the default
    table = table[[c for c in table.columns if isinstance(c, str) or c >= 0]
                  + [c for c in table.columns if not isinstance(c, str) and c < 0]]
    table.columns = [c if isinstance(c, str) else "default" if c < 0 else f"{c} ahead"
                     for c in table.columns]
    ms_off = df[df.ahead == 0].set_index(["threads", "density", "format", "kernel"]).median_ms
    table.insert(4, "off ms", table.set_index(["threads", "density", "format", "kernel"])
                 .index.map(ms_off).round(3))
    lines = [
        "# Next-row prefetch in the sparse MLP kernels", "",
        f"- {time.strftime('%Y-%m-%d %H:%M')}, `python experiments/bench_prefetch.py "
        f"--reps {args.reps} --threads {' '.join(map(str, args.threads))}`",
        f"- machine: {machine_info()['cpu']}; `_fast.info()`: {_fast.info()}",
        f"- versions: {versions()}",
        f"- {args.shape} shapes, batch 1, medians of {args.reps} interleaved repeats; columns "
        "'k ahead' (k pairs / groups of four rows) and 'default' are the speedup over no "
        "prefetch (off ms / ms), ratio of medians", "",
        "| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns),
    ]
    for row in table.itertuples(index=False):
        lines.append("| " + " | ".join(f"{v:.2f}" if isinstance(v, float) else str(v)
                                       for v in row) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> pd.DataFrame:
    def run(args):
        df = measure(args.shape, args.densities, args.threads, args.reps)
        return df, markdown(df, args)

    return run_sweep("bench_prefetch", __doc__, run, RESULTS, argv, reps=21)


if __name__ == "__main__":
    main()
