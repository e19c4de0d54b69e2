"""What 2 MiB pages buy the sparse MLP kernels: every format with the by-index kernel's
weights and the weight cache's row buffers in 4 KiB pages and in 2 MiB pages, interleaved
in one loop.

    python experiments/bench_huge_pages.py           # ~1 min on 2 cores
    python experiments/bench_huge_pages.py --reps 61 --threads 1 2

Llama-3.2-3B MLP shapes, batch 1, random weights and active sets. Each format's weights
are built twice from the same float weights: one copy goes to
``IndexedMLP(..., huge_pages=False)`` and stays in 4 KiB pages (transparent huge pages in
``madvise`` mode give unadvised memory none), the other to ``IndexedMLP(...)``, which
collapses it (``sparselab._fast.pages.use_huge_pages``: ``MADV_HUGEPAGE`` then
``MADV_COLLAPSE``). A ``WeightCache`` on each copy holds the active rows, its buffers sized
for every neuron up front; the '4k' ones are allocated first with ``SPARSELAB_HUGE_PAGES=0``,
the '2m' ones advise theirs as a cache does by default. Both sides are checked to give the same bits, and
``/proc/self/smaps`` is read to check which pages each copy really has. Writes
``experiments/results/bench_huge_pages.{csv,md}``: medians with quartiles, and the
speedup of 2 MiB pages (ratio of medians, 4 KiB ms / 2 MiB ms).
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from sparselab import _fast
from sparselab._fast.pages import ENV_VAR, resident_huge_bytes
from sparselab._version import versions
from sparselab.evaluation.kernel_bench import (
    SHAPES,
    format_weights,
    interleaved,
    random_mask,
    random_mlp,
    run_sweep,
    stats_ms,
)
from sparselab.evaluation.suite_report import machine_info

RESULTS = Path(__file__).resolve().parent / "results"
FORMATS = ("float32", "bfloat16", "int8_b32", "int8_row")
PAGES = ("4k", "2m")
MIB = 1 << 20


def _tensors(weights) -> list[torch.Tensor]:
    """The tensors the kernel reads (the int8 codes, not the per-row scales)."""
    return [getattr(w, "q", w) for w in weights]


def two_copies(g32, u32, d32) -> dict:
    """'4k' and '2m' -> every format's (gate, up, down_t), built separately from clones of
    the same float weights, so the two sides share no memory."""
    return {p: format_weights(g32.clone(), u32.clone(), d32.clone()) for p in PAGES}


def kernels(copies, threads: int) -> dict:
    """(format, pages) -> IndexedMLP; only the '2m' side is collapsed."""
    return {(f, p): _fast.IndexedMLP(*copies[p][f], "silu", threads, huge_pages=p == "2m")
            for f in FORMATS for p in PAGES}


@contextmanager
def pages_advised(on: bool):
    """Within: huge-page advice on (the default) or off (``$SPARSELAB_HUGE_PAGES=0``)."""
    old = os.environ.get(ENV_VAR)
    if not on:
        os.environ[ENV_VAR] = "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(ENV_VAR, None)
        else:
            os.environ[ENV_VAR] = old


def caches(copies, n_neurons: int) -> dict:
    """(format, pages) -> an empty WeightCache over that copy's weights, its buffers sized
    for every neuron up front (no growth, so no later allocation). The '4k' ones are
    allocated first: memory freed after advice can come back advised, so the '4k' side
    must not allocate after anything was advised."""
    out = {}
    for p in PAGES:  # '4k' first
        with pages_advised(p == "2m"):
            for f in FORMATS:
                out[(f, p)] = _fast.WeightCache(*copies[p][f][:2], down_t=copies[p][f][2],
                                                capacity=n_neurons)
    return out


def page_check(copies, held) -> dict:
    """(kernel, format, pages) -> MiB in huge pages, from smaps: the weights' mappings
    (by index) and the cache's row buffers."""
    out = {}
    for f in FORMATS:
        for p in PAGES:
            out[("index_kernel", f, p)] = resident_huge_bytes(*_tensors(copies[p][f])) / MIB
            out[("cache_kernel", f, p)] = resident_huge_bytes(held[(f, p)]._gu, held[(f, p)]._dt) / MIB
    return out


def measure(shape: str, densities, threads, reps: int, seed: int = 0) -> tuple[pd.DataFrame, dict]:
    hidden, inter = SHAPES[shape]
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    copies = two_copies(*random_mlp(shape, gen))
    x32 = torch.randn(1, hidden, generator=gen)
    xs = {f: x32.to(torch.bfloat16) if f == "bfloat16" else x32 for f in FORMATS}
    held = caches(copies, inter)  # before the IndexedMLPs advise anything
    rows, collapsed = [], {}
    for nt in threads:
        mlps = kernels(copies, nt)
        collapsed.update({f: mlps[(f, "2m")].huge_page_bytes / MIB for f in FORMATS
                          if mlps[(f, "2m")].huge_page_bytes})
        for dens in densities:
            mask = random_mask(inter, dens, rng)
            idx = np.flatnonzero(mask)
            for cache in held.values():  # sized for every neuron: never grows
                cache.update(mask)
            fns = {}
            for f in FORMATS:  # advice never changes a bit: check it on every case
                x = xs[f]
                if not torch.equal(mlps[(f, "4k")](x, idx), mlps[(f, "2m")](x, idx)):
                    raise AssertionError(f"{f}, d = {dens}: 4 KiB and 2 MiB pages disagree (by index)")
                if not torch.equal(held[(f, "4k")].forward(x, "silu", n_threads=nt),
                                   held[(f, "2m")].forward(x, "silu", n_threads=nt)):
                    raise AssertionError(f"{f}, d = {dens}: 4 KiB and 2 MiB pages disagree (cache)")
                for p in PAGES:
                    fns[("index_kernel", f, p)] = lambda m=mlps[(f, p)], x=x, i=idx: m(x, i)
                    fns[("cache_kernel", f, p)] = (lambda c=held[(f, p)], x=x, nt=nt:
                                                   c.forward(x, "silu", n_threads=nt))
            t = interleaved(fns, reps)
            for (kernel, f, p), ns in t.items():
                med, q1, q3 = stats_ms(ns)
                rows.append(dict(shape=shape, threads=nt, density=dens, kernel=kernel, format=f,
                                 pages=p, median_ms=med, q1_ms=q1, q3_ms=q3, reps=reps))
            print(f"threads {nt}, d = {dens}: done", flush=True)
    if not collapsed:
        raise SystemExit("nothing was collapsed to huge pages (SPARSELAB_HUGE_PAGES=0, THP "
                         "'never', or a kernel without MADV_COLLAPSE): nothing to compare")
    df = pd.DataFrame(rows)
    key = ["threads", "density", "kernel", "format"]
    small = df[df.pages == "4k"].set_index(key).median_ms
    df["speedup_2m"] = (df.set_index(key).index.map(small) / df.median_ms).round(3)
    return df, dict(collapsed_mib=collapsed, resident_mib=page_check(copies, held))


def markdown(df: pd.DataFrame, info: dict, args) -> str:
    key = ["threads", "density", "kernel", "format"]
    side = {p: df[df.pages == p].set_index(key) for p in PAGES}
    res = info["resident_mib"]
    lines = [
        "# Sparse MLP kernels: weights and cache buffers in 4 KiB pages against 2 MiB pages", "",
        f"- {time.strftime('%Y-%m-%d %H:%M')}, `python experiments/bench_huge_pages.py "
        f"--reps {args.reps} --threads {' '.join(map(str, args.threads))}`",
        f"- machine: {machine_info()['cpu']}; `_fast.info()`: {_fast.info()}",
        f"- versions: {versions()}",
        f"- {args.shape} shapes, batch 1, medians (quartiles) of {args.reps} interleaved "
        "repeats; '4k/2m' is the speedup of 2 MiB pages, ratio of medians; same output "
        "bits on both sides (checked for every case)",
        "- huge pages from /proc/self/smaps after the run (MiB, 4 KiB side / 2 MiB side; by "
        "index: the weights, cache: its row buffers): "
        + ", ".join(f"{k.split('_')[0]} {f} {res[(k, f, '4k')]:.0f} / {res[(k, f, '2m')]:.0f}"
                    for k in ("index_kernel", "cache_kernel") for f in FORMATS), "",
        "| threads | density | kernel | format | 4 KiB pages ms | 2 MiB pages ms | 4k/2m |",
        "|---|---|---|---|---|---|---|",
    ]
    for k, r4 in side["4k"].iterrows():
        r2 = side["2m"].loc[k]
        lines.append(f"| {k[0]} | {k[1]:.0%} | {k[2].split('_')[0]} | {k[3]} "
                     f"| {r4.median_ms:.3f} ({r4.q1_ms:.3f}-{r4.q3_ms:.3f}) "
                     f"| {r2.median_ms:.3f} ({r2.q1_ms:.3f}-{r2.q3_ms:.3f}) "
                     f"| {r2.speedup_2m:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> pd.DataFrame:
    def run(args):
        df, info = measure(args.shape, args.densities, args.threads, args.reps)
        return df, markdown(df, info, args)

    return run_sweep("bench_huge_pages", __doc__, run, RESULTS, argv, reps=41)


if __name__ == "__main__":
    main()
