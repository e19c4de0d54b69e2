"""A/B of the kernels' inner-loop variants that a benchmark knob switches: both kernels,
each variant, interleaved in one loop in a new random order every rep.

    flock -x /tmp/sparselab-bench.lock python experiments/bench_loops.py --knob bf16_down
    python experiments/bench_loops.py --knob f32_width --reps 61 --densities 0.3 0.5
    python experiments/bench_loops.py --knob bf16_down --batch 16   # where compute limits

Knobs (``--knob``):

- ``bf16_down``: the avx512bf16 path's bf16 down pass in ``vdpbf16ps`` (two rows per
  instruction, the default) against the widening loop of the avx512 path
  (``_fast._mlp._set_bf16_down_dp``). Both read h rounded to bf16, so they compute the same
  model and differ only in the order of the fp32 sums. Needs AVX512-BF16.
- ``f32_width``: fp32 in the 512-bit loops (the default on AVX-512 CPUs) against the 256-bit
  loops of the avx2 path (``_fast._mlp._set_f32_512``). Needs AVX-512.

Llama-3.2-3B MLP shapes, batch 1, random weights and active sets
(``kernel_bench.knob_sweep``: each call sets the knob, then runs its kernel). Writes
``experiments/results/bench_loops_<knob>[_batch<B>].{csv,md}``: medians with quartiles, and the speedup
of the default over the alternative (ratio of medians).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd

from sparselab import _fast
from sparselab._fast import _mlp, isa
from sparselab._version import versions
from sparselab.evaluation.kernel_bench import knob_sweep, run_sweep
from sparselab.evaluation.suite_report import machine_info

RESULTS = Path(__file__).resolve().parent / "results"
KEY = ["threads", "density", "kernel"]
# knob -> (setter, format, the path it needs, label of 0, label of 1 = the default)
KNOBS = {
    "bf16_down": (_mlp._set_bf16_down_dp, "bfloat16", "avx512bf16", "widening", "vdpbf16ps"),
    "f32_width": (_mlp._set_f32_512, "float32", "avx512", "256-bit", "512-bit"),
}


def measure(knob: str, shape: str, densities, threads, reps: int, seed: int = 0,
            batch: int = 1) -> pd.DataFrame:
    setter, fmt, path, _, _ = KNOBS[knob]
    if path not in isa.supported():
        raise SystemExit(f"--knob {knob} needs the {path} path; this CPU runs {isa.supported()}")
    with isa.use(path):
        rows = knob_sweep(shape, densities, threads, reps, (fmt,), setter, (0, 1), 1, "on", seed,
                          batch)
    return speedups(pd.DataFrame(rows))


def speedups(df: pd.DataFrame) -> pd.DataFrame:
    """Adds ``speedup_vs_off``: the alternative's (``on == 0``) median over each row's."""
    off = df[df.on == 0].set_index(KEY).median_ms
    df = df.copy()
    df["speedup_vs_off"] = (df.set_index(KEY).index.map(off) / df.median_ms).round(3)
    return df


def markdown(df: pd.DataFrame, knob: str, batch: int, args) -> str:
    _, fmt, _, off_name, on_name = KNOBS[knob]
    off, on = df[df.on == 0].set_index(KEY), df[df.on == 1].set_index(KEY)
    gains = on.speedup_vs_off
    lines = [
        f"# Inner loops, {fmt}: {on_name} (default) against {off_name}", "",
        f"- {time.strftime('%Y-%m-%d %H:%M')}, `python experiments/bench_loops.py --knob {knob} "
        f"--batch {batch} --reps {args.reps} --densities {' '.join(map(str, args.densities))} "
        f"--threads {' '.join(map(str, args.threads))}`",
        f"- machine: {machine_info()['cpu']}; `_fast.info()`: {_fast.info()}",
        f"- versions: {versions()}",
        f"- {args.shape} shapes, batch {batch}, medians [quartiles] of {args.reps} repeats in a new "
        f"random order each; speedup = {off_name} ms / {on_name} ms",
        f"- speedup over all cells: {gains.min():.2f}-{gains.max():.2f}x, median "
        f"{gains.median():.2f}x", "",
        f"| threads | density | kernel | {off_name} ms | {on_name} ms | speedup |",
        "|---|---|---|---|---|---|",
    ]
    for key in off.index:
        a, b = off.loc[key], on.loc[key]
        lines.append(f"| {key[0]} | {key[1]:.0%} | {key[2]} | {a.median_ms:.3f} "
                     f"[{a.q1_ms:.3f}-{a.q3_ms:.3f}] | {b.median_ms:.3f} "
                     f"[{b.q1_ms:.3f}-{b.q3_ms:.3f}] | {b.speedup_vs_off:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> pd.DataFrame:
    # --knob and --batch here; run_sweep parses the rest (--shape, --densities, ...)
    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--knob", choices=sorted(KNOBS), default="bf16_down")
    ap.add_argument("--batch", type=int, default=1)
    ours, rest = ap.parse_known_args(sys.argv[1:] if argv is None else argv)
    name = f"bench_loops_{ours.knob}" + (f"_batch{ours.batch}" if ours.batch != 1 else "")

    def run(args):
        df = measure(ours.knob, args.shape, args.densities, args.threads, args.reps,
                     batch=ours.batch)
        return df, markdown(df, ours.knob, ours.batch, args)

    return run_sweep(name, __doc__, run, RESULTS, rest, reps=41)


if __name__ == "__main__":
    main()
