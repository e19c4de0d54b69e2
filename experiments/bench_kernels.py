"""Benchmark of ``sparselab._fast``: sparse MLP kernels, cache updates, mask ops.

    python experiments/bench_kernels.py            # full run (< 10 min on 2 cores)
    python experiments/bench_kernels.py --quick    # small smoke run (~1 min)

Writes ``experiments/results/bench_kernels.csv`` (one row per measurement) and
``experiments/results/bench_kernels.md`` (the tables the README shows). Every group of
methods that are compared is measured in one loop, interleaved rep by rep (the order
rotates), so a noisy neighbour or a frequency change hits all of them alike. Reported:
median and inter-quartile range over the repeats, speedups as ratios of medians.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from sparselab import _fast
from sparselab.evaluation.kernel_bench import (
    CHURNS,
    DENSITIES,
    SHAPES,
    TARGET_SHAPE,
    Rows,
    bench_ceiling,
    bench_formats,
    bench_mask_ops,
    bench_mlp,
    bench_update,
)

RESULTS = Path(__file__).resolve().parent / "results"


def fmt(v, nd=2):
    return f"{v:.{nd}f}" if isinstance(v, float) else str(v)


def write_markdown(rows: Rows, path: Path, meta: dict):
    R = rows.rows
    lines = ["# `sparselab._fast` kernel benchmark", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items()]
    lines += ["", "Medians over interleaved repeats; `[q1-q3]` is the inter-quartile range. "
              "Speedups are ratios of medians. Sparse MLP targets: 3B shapes, fp32, batch 1, "
              "1 thread, speedup >= 0.85/d.", ""]
    lines += ["## Sparse MLP (batch 1, SiLU)", "",
              "| shape | dtype | thr | density | dense torch ms | regather+matmul ms | "
              "over the cache ms | by index ms | cache speedup | by-index speedup | "
              "target | met? |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    mlp = [r for r in R if r["section"] == "mlp"]
    keys = sorted({(r["shape"], r["dtype"], r["threads"], r["density"]) for r in mlp},
                  key=lambda k: (list(SHAPES).index(k[0]), k[1] != "float32", k[2], k[3]))
    by = {(r["shape"], r["dtype"], r["threads"], r["density"], r["method"]): r for r in mlp}

    def cell(r):
        return f"{r['median_ms']:.3f} [{r['q1_ms']:.3f}-{r['q3_ms']:.3f}]"

    for k in keys:
        d, rg, k1, k2 = (by[k + (m,)] for m in ("dense_torch", "regather_matmul",
                                                 "cache_kernel", "index_kernel"))
        met = ""
        if k1["target"] != "":
            met = f"k1 {'yes' if k1['target_met'] else 'NO'} / k2 {'yes' if k2['target_met'] else 'NO'}"
        lines.append(f"| {k[0]} | {k[1]} | {k[2]} | {k[3]:.0%} | {cell(d)} | {cell(rg)} | "
                     f"{cell(k1)} | {cell(k2)} | {k1['speedup_vs_dense']:.2f}x | "
                     f"{k2['speedup_vs_dense']:.2f}x | {fmt(k1['target'])} | {met} |")
    # bf16 vs fp32
    lines += ["", "## bf16 vs fp32 (same kernel, same density; target >= 1.6x)", "",
              "| shape | thr | density | kernel | fp32 ms | bf16 ms | bf16 speedup | met? |",
              "|---|---|---|---|---|---|---|---|"]
    for (shape, dt, thr, dens) in keys:
        if dt != "float32" or (shape, "bfloat16", thr, dens, "cache_kernel") not in by:
            continue
        for m in ("cache_kernel", "index_kernel"):
            a, b = by[(shape, "float32", thr, dens, m)], by[(shape, "bfloat16", thr, dens, m)]
            r = a["median_ms"] / b["median_ms"]
            tgt = shape == TARGET_SHAPE and thr == 1
            lines.append(f"| {shape} | {thr} | {dens:.0%} | {m} | {a['median_ms']:.3f} | "
                         f"{b['median_ms']:.3f} | {r:.2f}x | "
                         f"{('yes' if r >= 1.6 else 'NO') if tgt else ''} |")
    # updates
    upd = [r for r in R if r["section"] == "update"]
    lines += ["", "## Cache update (k neurons swapped per update, 1 thread) vs full re-gather", "",
              "| shape | dtype | density | churn | k | update (rows) ms | update (down columns) "
              "ms | full regather ms | rows speedup | columns speedup | target | met? |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    ub = {(r["shape"], r["dtype"], r["density"], r["churn"], r["method"]): r for r in upd}
    for r in upd:
        if r["method"] != "update_rows":
            continue
        key = (r["shape"], r["dtype"], r["density"])
        c = ub[key + (r["churn"], "update_columns")]
        full = ub[key + ("", "full_regather")]
        lines.append(f"| {r['shape']} | {r['dtype']} | {r['density']:.0%} | {r['churn']:.0%} | "
                     f"{r['neurons_swapped']} | {r['median_ms']:.3f} | {c['median_ms']:.3f} | "
                     f"{full['median_ms']:.3f} | {r['speedup_vs_regather']:.1f}x | "
                     f"{c['speedup_vs_regather']:.1f}x | {fmt(r['target'], 0)} | "
                     f"{('yes' if r['target_met'] else 'NO') if r['target'] != '' else ''} |")
    fk = [r for r in R if r["section"] == "update_fixed_k"]
    lines += ["", "## Fixed churn (64 neurons swapped) at 10 % vs 50 % active (target ratio <= 1.5)",
              "", "| shape | dtype | ms at 10 % | ms at 50 % | ratio | met? |", "|---|---|---|---|---|---|"]
    for i in range(0, len(fk), 2):
        a, b = fk[i], fk[i + 1]
        met = ("yes" if a["target_met"] else "NO") if a["target"] != "" else ""
        lines.append(f"| {a['shape']} | {a['dtype']} | {a['median_ms']:.3f} | {b['median_ms']:.3f} "
                     f"| {a['ratio_50_vs_10']:.2f} | {met} |")
    mo = [r for r in R if r["section"] == "mask_ops"]
    lines += ["", "## Mask ops on 8192-neuron masks (target: xor_diff + union < 10 us)", "",
              "| batch | density | op | median us | IQR us | met? |", "|---|---|---|---|---|---|"]
    for r in mo:
        met = ("yes" if r["target_met"] else "NO") if r["target"] != "" else ""
        lines.append(f"| {r['batch']} | {r['density']:.0%} | {r['method']} | {r['median_us']:.2f} "
                     f"| {r['q1_us']:.2f}-{r['q3_us']:.2f} | {met} |")
    fm = [r for r in R if r["section"] == "formats"]
    if fm:
        lines += formats_markdown(fm)
    ce = [r for r in R if r["section"] == "ceiling"]
    if ce:
        lines += ceiling_markdown(ce, fm)
    mem = [r for r in R if r["section"] == "memory"]
    lines += ["", "## Cache memory (down_t passed in; target: extra <= active rows held)", "",
              "| shape | dtype | density | active rows MB | cache extra MB | ratio | MLP MB |",
              "|---|---|---|---|---|---|---|"]
    for r in mem:
        lines.append(f"| {r['shape']} | {r['dtype']} | {r['density']:.0%} | "
                     f"{r['active_row_bytes'] / 2**20:.1f} | {r['extra_bytes'] / 2**20:.1f} | "
                     f"{r['ratio']:.2f} | {r['mlp_bytes'] / 2**20:.1f} |")
    path.write_text("\n".join(lines) + "\n")


def formats_markdown(fm) -> list[str]:
    """Every weight format side by side: ms per MLP token and speedup over fp32 (same kernel,
    same density, same run), with the bytes each format reads per weight."""
    by = {(r["threads"], r["density"], r["method"], r["dtype"], r["isa"]): r for r in fm}
    best = next(r["isa"] for r in fm if r["method"] == "cache_kernel" and r["dtype"] == "float32")
    shape = fm[0]["shape"]
    bpw = {r["dtype"]: r["bytes_per_weight"] for r in fm}
    out = ["", f"## Weight formats side by side ({shape} MLP, batch 1, SiLU, path {best})", "",
           f"Bytes per weight (scales included): fp32 {bpw['float32']:g}, bf16 {bpw['bfloat16']:g}, "
           f"int8 with per-block-32 float32 scales {bpw['int8_b32']:g}, per-block-64 "
           f"{bpw['int8_b64']:g}, per-row {bpw['int8_row']:g}; \"row+col\": per-row, and down also a float32 scale per "
           "output channel (one vector per layer, multiplied into y after the down pass; the "
           "format that keeps quality at 1 byte per weight); \"x8\": the same int8 weights with x rounded to int8 per "
           "group of 64 for gate and up (integer dot products, `_fast.info()[\"int8_dot\"]`). "
           "Speedups are over fp32 with the same kernel in the same loop. "
           "`@avx2`: the bf16 kernel forced onto the AVX2 path (what a CPU without AVX-512 "
           "runs; same memory system). Targets: bf16 >= 1.8x fp32, int8 >= 3x fp32 and >= 1.6x "
           "bf16 (at 30 % and 50 %).", "",
           "| thr | density | kernel | fp32 ms | bf16 ms (x) | bf16@avx2 ms (x) | int8 b32 ms "
           "(x fp32, x bf16) | int8 b64 ms (x fp32, x bf16) | int8 row ms (x fp32, x bf16) | "
           "int8 row+col ms (x fp32, x bf16) | "
           "int8 b32 x8 ms (x fp32) | int8 b64 x8 ms (x fp32) | int8 row x8 ms (x fp32) | "
           "dense fp32 / bf16 torch ms | dense int8 b32 / b64 / row / row+col kernel ms |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    keys = sorted({(r["threads"], r["density"]) for r in fm})
    for thr, dens in keys:
        def g(method, f, path=best, thr=thr, dens=dens):
            r = by.get((thr, dens, method, f, path))
            return r["median_ms"] if r else float("nan")
        for kern in ("cache_kernel", "index_kernel"):
            f32, b16, b16a = g(kern, "float32"), g(kern, "bfloat16"), g(kern, "bfloat16", "avx2")
            int8 = [g(kern, f) for f in ("int8_b32", "int8_b64", "int8_row", "int8_rowcol")]
            x8 = [g(kern, f) for f in ("int8_b32_x8", "int8_b64_x8", "int8_row_x8")]
            out.append(
                f"| {thr} | {dens:.0%} | {kern} | {f32:.3f} | {b16:.3f} ({f32 / b16:.2f}x) | "
                f"{b16a:.3f} ({f32 / b16a:.2f}x) | "
                + " | ".join(f"{t:.3f} ({f32 / t:.2f}x, {b16 / t:.2f}x)" for t in int8) + " | "
                + " | ".join(f"{t:.3f} ({f32 / t:.2f}x)" for t in x8) + " | "
                f"{g('dense_torch', 'float32'):.2f} / {g('dense_torch', 'bfloat16'):.2f} | "
                + " / ".join(f"{g('dense_kernel', f):.2f}"
                             for f in ("int8_b32", "int8_b64", "int8_row", "int8_rowcol"))
                + " |")
    return out


def ceiling_markdown(ce, fm) -> list[str]:
    """The by-index kernel's compute limit (batch 16: weights served from L1) next to what
    the kernels stream from DRAM at batch 1, same density, one thread (section "formats"):
    by index, over the cache, and by index over every row in order (the dense int8 kernel)."""
    best = next(q["isa"] for q in fm if q["method"] == "cache_kernel")
    dens = ce[0]["density"]

    def rate(method, dtype):
        """GB/s of weights (scales included) a batch-1 row of section "formats" streams."""
        r = next((q for q in fm if q["method"] == method and q["dtype"] == dtype
                  and q["threads"] == 1 and q["density"] == dens and q["isa"] == best), None)
        if r is None or not r.get("n_active"):
            return float("nan")
        n = r["inter"] if method == "dense_kernel" else r["n_active"]
        return 3 * n * r["hidden"] * r["bytes_per_weight"] / (r["median_ms"] * 1e6)

    out = ["", f"## Compute limit of the by-index kernel ({ce[0]['shape']}, {dens:.0%} density, "
               "1 thread)", "",
           f"At batch {int(ce[0]['batch'])} each weight row read from memory serves every token "
           "from L1, so bytes of weights processed per second (scales included, counted once "
           "per token) is what the instructions allow. Beside it, GB/s of weights the kernels "
           "stream from DRAM at batch 1 (section above): by index, over the cache's contiguous "
           "rows, and by index over every row in order (int8's dense kernel, at 100 %). The "
           "closer the by-index rate to the limit, the less a format with fewer bytes per "
           "weight can gain before its instructions limit it.", "",
           "| format | batch-16 ms | processed GB/s (compute limit) | by index GB/s | over the "
           "cache GB/s | every row in order GB/s | by index / limit |",
           "|---|---|---|---|---|---|---|"]
    for r in ce:
        f = r["dtype"]
        index = rate("index_kernel", f)
        inorder = rate("dense_kernel", f)
        out.append(f"| {f} | {r['median_ms']:.3f} | {r['gb_per_s']:.1f} | {index:.1f} | "
                   f"{rate('cache_kernel', f):.1f} | {inorder:.1f} | {index / r['gb_per_s']:.2f} |"
                   .replace("| nan ", "|  "))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small shapes, few repeats")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    if args.quick:
        shapes, reps = ["smollm2-135m"], args.reps or 5
        dtypes, threads, dens, churns = [torch.float32, torch.bfloat16], [1], (0.1, 0.3), (0.05,)
    else:
        shapes, reps = list(SHAPES), args.reps or 21
        dtypes, threads, dens, churns = [torch.float32, torch.bfloat16], [1, 2], DENSITIES, CHURNS
    rows = Rows()
    t0 = time.perf_counter()
    bench_mask_ops(rows, 2000 if not args.quick else 200, rng)
    bench_mlp(rows, shapes, dtypes, threads, dens, reps, rng)
    bench_update(rows, shapes, dtypes, dens, churns, reps, rng)
    if not args.quick:
        bench_formats(rows, TARGET_SHAPE, [1, 2], (0.1, 0.3, 0.5), reps, rng)
        bench_ceiling(rows, TARGET_SHAPE, reps, rng)
    else:
        bench_formats(rows, "smollm2-135m", [1], (0.3,), reps, rng)
        bench_ceiling(rows, "smollm2-135m", reps, rng)
    info = _fast.info()
    meta = {"machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
            "cpu count": os.cpu_count(), "torch": torch.__version__,
            "_fast build": f"openmp={info['openmp']} isa={info['isa']} "
                           f"(supported: {','.join(info['supported_isas'])}), "
                           f"int8 x int8 dot products: {info['int8_dot']}",
            "command": "flock -x /tmp/sparselab-bench.lock python experiments/bench_kernels.py",
            "finished": time.strftime("%Y-%m-%d %H:%M %Z"),
            "repeats": reps, "mode": "quick" if args.quick else "full",
            "wall time s": round(time.perf_counter() - t0, 1)}
    args.out.mkdir(parents=True, exist_ok=True)
    rows.write_csv(args.out / "bench_kernels.csv")
    write_markdown(rows, args.out / "bench_kernels.md", meta)
    print(f"wrote {args.out / 'bench_kernels.csv'} and bench_kernels.md in {meta['wall time s']} s")


if __name__ == "__main__":
    main()
