"""A/B of the sparse MLP kernels between two builds of sparselab (e.g. before and after a
kernel change), interleaved in fresh processes so machine drift hits both sides alike.

    flock -x /tmp/sparselab-bench.lock python experiments/ab_builds.py OLD_CHECKOUT NEW_CHECKOUT \
        --rounds 5 --reps 15 --out experiments/results/ab_builds.md
    ... --weights int8_row      # int8 weights, a scale per row (int8_b64: per 64 weights)
    ... --weights bfloat16 --threads 2

Each checkout must have its `_fast` built in place (`python setup.py build_ext --inplace`).
Llama-3.2-3B MLP shapes (hidden 3072, intermediate 8192), batch 1, random sorted active sets
at 10 / 30 / 50 %; per round and side: the median of ``reps`` calls after 3 warm-ups.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ONE_SIDE = r'''
import json, sys, time
import numpy as np, torch
from sparselab import _fast
torch.manual_seed(0)
H, I = 3072, 8192
gate, up, down = torch.randn(I, H) * 0.02, torch.randn(I, H) * 0.02, torch.randn(H, I) * 0.02
down_t = down.t().contiguous()
x = torch.randn(1, H)
nt, reps, weights = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
if weights == "bfloat16":
    gate, up, down_t, x = (w.to(torch.bfloat16) for w in (gate, up, down_t, x))
elif weights != "float32":
    from sparselab._fast.quant import quantize_int8
    block = {"int8_row": None, "int8_b64": 64, "int8_b32": 32}[weights]
    gate, up, down_t = (quantize_int8(w, block) for w in (gate, up, down_t))
out = {}
for d in (0.1, 0.3, 0.5):
    idx = torch.randperm(I)[: int(d * I)].sort().values
    mask = torch.zeros(I, dtype=torch.bool)
    mask[idx] = True
    cache = _fast.WeightCache(gate, up, down_t=down_t)
    cache.update(mask)
    for name, fn in (("by index", lambda: _fast.sparse_mlp(x, gate, up, down_t, idx, "silu", n_threads=nt)),
                     ("over the cache", lambda: cache.forward(x, "silu", n_threads=nt))):
        for _ in range(3):
            fn()
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t) * 1e3)
        out[f"{name}|{d}"] = float(np.median(ts))
print(json.dumps(out))
'''


def run_side(checkout: Path, threads: int, reps: int, weights: str) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=str(checkout))
    out = subprocess.run([sys.executable, "-c", ONE_SIDE, str(threads), str(reps), weights], cwd=checkout,
                         env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _commit(checkout: Path) -> str:
    """The checkout's commit (short hash), or "not a git checkout"."""
    out = subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True)
    return f"commit {out.stdout.strip()}" if out.returncode == 0 else "not a git checkout"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("old", type=Path)
    ap.add_argument("new", type=Path)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--weights", default="float32", choices=("float32", "bfloat16", "int8_row", "int8_b64", "int8_b32"))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    runs: dict[str, dict[str, list[float]]] = {}
    for _ in range(args.rounds):
        for side, path in (("old", args.old), ("new", args.new)):
            for key, ms in run_side(path, args.threads, args.reps, args.weights).items():
                runs.setdefault(key, {"old": [], "new": []})[side].append(ms)
    lines = [f"# A/B of two builds: `{args.old}` (old, {_commit(args.old)}) vs `{args.new}` "
             f"(new, {_commit(args.new)})", "",
             f"{args.rounds} interleaved rounds, {args.reps} calls each, {args.threads} thread(s), "
             f"{args.weights} weights, 3B MLP shapes, batch 1. ms: median of the rounds' medians "
             "[min-max].", "",
             "| kernel | density | old ms | new ms | new / old |", "|---|---|---|---|---|"]
    for key, sides in runs.items():
        name, d = key.split("|")
        old, new = statistics.median(sides["old"]), statistics.median(sides["new"])
        lines.append(f"| {name} | {float(d):.0%} | {old:.2f} [{min(sides['old']):.2f}-{max(sides['old']):.2f}] "
                     f"| {new:.2f} [{min(sides['new']):.2f}-{max(sides['new']):.2f}] | {new / old:.3f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
