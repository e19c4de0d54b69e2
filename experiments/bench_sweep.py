"""A sweep of 8 cells on a 2-worker Dask LocalCluster against the same cells run serially.

    flock -x /tmp/sparselab-bench.lock python experiments/bench_sweep.py

Records SmolLM2 (layers 0, 10, 20, 29; ``mlp_in`` and ``h``) on the first ``--texts``
passages of the shipped corpus to a Zarr store once, then runs the grid
rule {Calibrated, TopK} x density {0.3, 0.5} x rank {16, 64} (8 cells: train low-rank
predictors on 75 % of the sequences, evaluate on the rest) twice per repeat, on a
2-worker ``LocalCluster`` (``sl.sweep(...)``) and serially in this process
(``client=False``), alternating which goes first. Every cell runs with one torch
thread, so the two DataFrames must be equal (checked, exactly); the wall times are
reported with the cluster's start-up included. Results:
experiments/results/bench_sweep.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
GRID = {"rule": ["Calibrated", "TopK"], "density": [0.3, 0.5], "rank": [16, 64]}
LAYERS = [0, 10, 20, 29]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    if args.texts < 8 or args.repeats < 1:
        parser.error("--texts must be >= 8 and --repeats >= 1")
    import pandas as pd
    import torch

    import sparselab as sl

    torch.set_num_threads(2)
    model, tok = sl.load_model()
    work = Path(tempfile.mkdtemp(prefix="bench_sweep_"))
    try:
        store = work / "smollm2.zarr"
        trace = sl.record(model, tok, sl.load_corpus(n=args.texts), max_length=256, batch_size=8,
                          layers=LAYERS, store=("mlp_in", "h"), out=store, progress=False)
        n_tokens = trace.n_tokens
        del model
        times: dict[str, list[float]] = {"cluster": [], "serial": []}
        frames = {}
        for repeat in range(args.repeats):
            order = ("cluster", "serial") if repeat % 2 == 0 else ("serial", "cluster")
            for mode in order:
                t0 = time.perf_counter()
                df = sl.sweep(GRID, traces={"smollm2": str(store)}, client=None if mode == "cluster" else False,
                              progress=False)
                times[mode].append(time.perf_counter() - t0)
                frames[mode] = df
                print(mode, f"{times[mode][-1]:.1f} s", flush=True)
        pd.testing.assert_frame_equal(frames["cluster"], frames["serial"])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    cells = len(frames["serial"][["rule", "density", "rank"]].drop_duplicates())
    serial, cluster = statistics.median(times["serial"]), statistics.median(times["cluster"])
    meta = {"command": f"python experiments/bench_sweep.py --texts {args.texts} --repeats {args.repeats}",
            "versions": sl.versions(), "cpu_count": os.cpu_count(),
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "grid": GRID, "layers": LAYERS, "n_tokens": n_tokens, "cells": cells}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_sweep.json").write_text(json.dumps({"meta": meta, "seconds": times}, indent=1))
    lines = [
        "# A sweep on a 2-worker LocalCluster against the same cells run serially (SmolLM2)", "",
        f"`{meta['command']}` ({meta['measured_at']}, {meta['cpu_count']} cores). {cells} cells "
        f"(rule x density x rank = {GRID}), layers {LAYERS}, {n_tokens} recorded tokens; each cell trains "
        "and evaluates low-rank predictors with one torch thread. Wall time of the whole sweep, cluster "
        "start-up included; the two runs alternate which goes first.", "",
        "| run | wall time, median s | each repeat s |", "|---|---:|---|",
        f"| serial (`client=False`) | {serial:.1f} | {', '.join(f'{t:.1f}' for t in times['serial'])} |",
        f"| 2-worker LocalCluster | {cluster:.1f} | {', '.join(f'{t:.1f}' for t in times['cluster'])} |", "",
        f"Serial / cluster: **{serial / cluster:.2f}x**. The two DataFrames are equal "
        "(`pandas.testing.assert_frame_equal`, exact).",
    ]
    (RESULTS / "bench_sweep.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
