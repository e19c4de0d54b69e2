"""How the down pass splits its work between threads: by output columns (every thread reads
its share of every active row) or by rows (two halves of the active rows, each summed into
its own y, then added), every format and kernel, both settings interleaved in one loop.

    python experiments/bench_down_split.py         # ~1.5 min on 2 cores
    python experiments/bench_down_split.py --reps 61 --threads 1 2

Llama-3.2-3B MLP shapes, batch 1, random weights and active sets. ``_fast._mlp._set_down_parts``
sets the number of row halves (1: columns only, as before; 2: the default); each call sets
it, then runs the kernel, so both are timed rep by rep in rotation. The number of halves
depends on the active set's size only, never on the thread count, so results stay bitwise
the same for any thread count either way (tests/test_fast_int8.py and test_fast.py check
it). Writes ``experiments/results/bench_down_split.{csv,md}``: medians with quartiles and
the speedup of two halves over one (ratio of medians).
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
FORMATS = ("float32", "bfloat16", "int8_rowcol", "int8_b64")
PARTS = (1, 2)


def measure(shape: str, densities, threads, reps: int, seed: int = 0) -> pd.DataFrame:
    return pd.DataFrame(knob_sweep(shape, densities, threads, reps, FORMATS, _mlp._set_down_parts,
                                   PARTS, 2, "parts", seed))  # 2: the shipped default


def markdown(df: pd.DataFrame, args) -> str:
    key = ["threads", "density", "format", "kernel"]
    wide = df.pivot_table(index=key, columns="parts", values="median_ms").reset_index()
    lines = [
        "# The down pass: threads split by columns, or by row halves", "",
        f"- {time.strftime('%Y-%m-%d %H:%M')}, `python experiments/bench_down_split.py "
        f"--reps {args.reps} --threads {' '.join(map(str, args.threads))}`",
        f"- machine: {machine_info()['cpu']}; `_fast.info()`: {_fast.info()}",
        f"- versions: {versions()}",
        f"- {args.shape} shapes, batch 1, medians of {args.reps} interleaved repeats; "
        "speedup: one half (columns only) ms / two halves ms", "",
        "| threads | density | format | kernel | columns only ms | two row halves ms | speedup |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in wide.itertuples(index=False):
        one, two = r[4], r[5]
        lines.append(f"| {r.threads} | {r.density:.0%} | {r.format} | {r.kernel} | {one:.3f} | "
                     f"{two:.3f} | {one / two:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> pd.DataFrame:
    def run(args):
        df = measure(args.shape, args.densities, args.threads, args.reps)
        return df, markdown(df, args)

    return run_sweep("bench_down_split", __doc__, run, RESULTS, argv, reps=41)


if __name__ == "__main__":
    main()
