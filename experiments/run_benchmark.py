"""End-to-end benchmark: dense vs sparse generation - TTFT, decode speed, memory, byte bound.

    python experiments/run_benchmark.py --device cpu --config experiments/configs/smollm2_135m.json --num_runs 50 --verbose
    python experiments/run_benchmark.py --device cpu --config experiments/configs/llama_skip_causal_3b.json --num_runs 50 --verbose
    python experiments/run_benchmark.py --config ... --threads 1 --max_new_tokens 16 --out /tmp/results

The configs (``experiments/configs/*.json``), the variants and how they are measured are
described in :mod:`sparselab.evaluation.suite`, which does the work; this file is its command
line. Results go to ``<out>/<config>_<timestamp>.json`` and ``.csv`` (one row per run) and
a stable latest copy ``<out>/<config>.json`` / ``.md``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

import sparselab as sl
from sparselab.evaluation.memory import MB
from sparselab.evaluation.suite import (  # noqa: F401  (re-exported for scripts and tests)
    full_model_bytes,
    load_config,
    measure,
    prepare,
)
from sparselab.evaluation.suite_report import report, write_results  # noqa: F401

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


# --------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="only 'cpu' (the sparse kernels run on the CPU)")
    ap.add_argument("--config", required=True, help="experiments/configs/<name>.json")
    ap.add_argument("--num_runs", type=int, default=None, help="measured runs per variant (config default)")
    ap.add_argument("--warmup_runs", type=int, default=None, help="warm-up runs per variant (config default)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: config, else torch's)")
    ap.add_argument("--max_new_tokens", type=int, default=None, help="new tokens per run (config default)")
    ap.add_argument("--out", default=str(RESULTS), help="results directory")
    ap.add_argument("--verbose", action="store_true", help="log every run and the setup")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark from the command line; returns the result (with ``paths``)."""
    args = parse_args(argv)
    if args.device != "cpu":
        raise SystemExit(f"--device {args.device!r}: the sparse kernels run on the CPU only; use --device cpu")
    config = load_config(args.config)
    threads = args.threads if args.threads is not None else config.get("threads")
    quiet = lambda msg: None  # noqa: E731
    log = print if args.verbose else quiet
    from tqdm.auto import tqdm

    setup = prepare(config, threads=threads, progress=True, log=log)
    b = setup.budget
    log(f"model {sl.models.model_identity(setup.model)}; RSS of the model {setup.rss_model / MB:.1f} MiB")
    log(f"bytes per decoded token {b.total / MB:.1f} MiB, f = {b.f:.3f}; bound at d = "
        f"{config['density']}: {b.bound(config['density']):.3f}x, with predictors "
        f"({setup.predictors.bytes / MB:.1f} MiB) {b.bound(config['density'], setup.predictors.bytes):.3f}x")
    log(f"torch threads {torch.get_num_threads()}, prompt {setup.input_ids.shape[1]} tokens")
    result, runs = measure(setup, num_runs=args.num_runs, warmup_runs=args.warmup_runs,
                           max_new_tokens=args.max_new_tokens, progress=True,
                           log=tqdm.write if args.verbose else None)
    result["args"] = vars(args)
    paths = write_results(result, runs, args.out)
    print(report(result, runs))
    print("results: " + ", ".join(str(p) for p in paths.values()))
    result["paths"] = {k: str(v) for k, v in paths.items()}
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
