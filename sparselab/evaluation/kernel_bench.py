"""Micro-benchmarks of ``sparselab._fast``: sparse MLP kernels, cache updates, mask ops.

    >>> from sparselab import kernel_bench as kb
    >>> rows = kb.Rows()
    >>> kb.bench_mlp(rows, ["smollm2-135m"], [torch.float32], [1], (0.1, 0.5), 9, np.random.default_rng(0))
    >>> pd.DataFrame(rows.rows)

Every group of methods that are compared is measured in one loop, interleaved rep by rep
(the order rotates), so a noisy neighbour or a frequency change hits all of them alike.
Reported: median and inter-quartile range over the repeats, speedups as ratios of
medians. ``experiments/bench_kernels.py`` runs the full set and writes the README's
tables; notebook 09 runs a small sweep of its own.
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sparselab import _fast
from sparselab._fast.pages import use_huge_pages
from sparselab._fast.quant import INT8_FORMATS as QUANT_FORMATS
from sparselab.evaluation.byte_bound import int8_bytes_per_weight

SHAPES = {"llama3.2-3b": (3072, 8192), "smollm2-135m": (576, 1536)}
DENSITIES = (0.05, 0.1, 0.3, 0.5)
CHURNS = (0.01, 0.05, 0.1, 0.3)
TARGET_SHAPE = "llama3.2-3b"


def interleaved(fns: dict, reps: int, warmup: int = 2, shuffle_seed: int | None = None) -> dict:
    """Time every callable ``reps`` times, rotating their order each rep -> ns arrays.

    Rotation keeps each callable's neighbours: one that always runs right after another
    on the same weights finds them warmer (in a scratch A/B, 2-5 % at two threads for an
    fp32 kernel the knob did not touch, and a change measured 1.09-1.74x faster in rotation
    and 0.94-1.06x shuffled). ``shuffle_seed``: a new random order every rep instead, which
    the kernel benchmarks use wherever two calls read the same weights (knob A/Bs, the
    re-gather and the by-index kernel, the by-index and the dense int8 kernel)."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    out = {n: [] for n in names}
    rng = None if shuffle_seed is None else np.random.default_rng(shuffle_seed)
    for r in range(reps):
        k = r % len(names)
        order = (names[k:] + names[:k] if rng is None
                 else [names[i] for i in rng.permutation(len(names))])
        for n in order:
            t0 = time.perf_counter_ns()
            fns[n]()
            out[n].append(time.perf_counter_ns() - t0)
    return {n: np.asarray(v, dtype=np.float64) for n, v in out.items()}


def stats_ms(ns: np.ndarray) -> tuple[float, float, float]:
    q1, med, q3 = np.percentile(ns, [25, 50, 75]) / 1e6
    return float(med), float(q1), float(q3)


def random_mask(n: int, density: float, rng) -> np.ndarray:
    m = np.zeros(n, dtype=bool)
    m[rng.choice(n, max(1, round(density * n)), replace=False)] = True
    return m


def swap(mask: np.ndarray, k: int, rng) -> np.ndarray:
    """Same size, ``k`` neurons out and ``k`` new neurons in."""
    m = mask.copy()
    k = min(k, int(mask.sum()), int((~mask).sum()))
    m[rng.choice(np.flatnonzero(mask), k, replace=False)] = False
    m[rng.choice(np.flatnonzero(~mask), k, replace=False)] = True
    return m


class Rows:
    def __init__(self):
        self.rows = []

    def add(self, **kw):
        self.rows.append(kw)

    def write_csv(self, path: Path):
        keys = []
        for r in self.rows:
            keys += [k for k in r if k not in keys]
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(self.rows)


def mlp_methods(x, gate, up, down, down_t, idx, idx_t, cache, nt) -> dict:
    """The four ways to compute one MLP token that the table compares. The by-index kernel
    is an ``IndexedMLP`` built once, as ``sl.sparsify`` runs it: its weights go on 2 MiB
    pages, and so does ``down`` for the dense matmul (every method on the same pages)."""
    indexed = _fast.IndexedMLP(gate, up, down_t, "silu", nt)
    use_huge_pages(down)

    def dense():
        return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)

    def regather():
        # the naive path: gather the active rows every token, then dense matmuls on them
        gs, us = gate.index_select(0, idx_t), up.index_select(0, idx_t)
        ds = down.index_select(1, idx_t)
        return F.linear(F.silu(F.linear(x, gs)) * F.linear(x, us), ds)

    return {
        "dense_torch": dense,
        "regather_matmul": regather,
        "cache_kernel": lambda: cache.forward(x, "silu", n_threads=nt),
        "index_kernel": lambda: indexed(x, idx),
    }


def regather_fn(gate, up, down_t, idx_t):
    def regather():
        # the cheapest full re-gather: three contiguous row gathers
        return (gate.index_select(0, idx_t), up.index_select(0, idx_t),
                down_t.index_select(0, idx_t))

    return regather


def toggler(cache, m0, m1):
    """Each call swaps the cache between m0 and m1, i.e. changes exactly the same neurons."""
    state = {"next": 1}
    masks = (m0, m1)

    def step():
        cache.update(masks[state["next"]])
        state["next"] ^= 1

    return step


def bench_mlp(rows: Rows, shapes, dtypes, threads, densities, reps, rng):
    for shape_name in shapes:
        hidden, inter = SHAPES[shape_name]
        g32, u32, d32 = random_mlp(shape_name)
        for dtype in dtypes:
            gate, up, down = (t.to(dtype) for t in (g32, u32, d32))
            down_t = down.t().contiguous()
            x = torch.randn(1, hidden).to(dtype)
            for nt in threads:
                torch.set_num_threads(nt)
                for dens in densities:
                    mask = random_mask(inter, dens, rng)
                    idx = np.flatnonzero(mask)
                    idx_t = torch.from_numpy(idx)
                    cache = _fast.WeightCache(gate, up, down_t=down_t)
                    cache.update(mask)

                    fns = mlp_methods(x, gate, up, down, down_t, idx, idx_t, cache, nt)
                    # shuffled: in rotation the by-index kernel would always follow the
                    # re-gather, which has just read the same rows
                    t = interleaved(fns, reps, shuffle_seed=int(rng.integers(2**31)))
                    dense_med = stats_ms(t["dense_torch"])[0]
                    is_target = shape_name == TARGET_SHAPE and dtype == torch.float32 \
                        and nt == 1 and dens in (0.1, 0.3, 0.5)
                    for name, ns in t.items():
                        med, q1, q3 = stats_ms(ns)
                        sp = dense_med / med
                        kern = name.startswith("kernel")
                        rows.add(section="mlp", shape=shape_name, hidden=hidden, inter=inter,
                                 dtype=str(dtype).replace("torch.", ""), threads=nt,
                                 density=dens, churn="", method=name,
                                 median_ms=round(med, 4), q1_ms=round(q1, 4), q3_ms=round(q3, 4),
                                 iqr_ms=round(q3 - q1, 4), reps=reps,
                                 speedup_vs_dense=round(sp, 3),
                                 target=round(0.85 / dens, 3) if is_target and kern else "",
                                 target_met=(sp >= 0.85 / dens) if is_target and kern else "")
                    print(f"mlp {shape_name} {dtype} t={nt} d={dens}: dense {dense_med:.2f} ms, "
                          f"cache {stats_ms(t['cache_kernel'])[0]:.2f}, "
                          f"by index {stats_ms(t['index_kernel'])[0]:.2f}, "
                          f"regather {stats_ms(t['regather_matmul'])[0]:.2f}", flush=True)
    torch.set_num_threads(max(threads))


FORMATS = ("float32", "bfloat16", "int8_b32", "int8_b64", "int8_row", "int8_rowcol",
           "int8_b32_x8", "int8_b64_x8", "int8_row_x8")
# the int8 formats: the benchmark's names (those of its result files) for
# sl.sparsify(weights=...)'s formats (quant.INT8_FORMATS: quantize_mlp_int8's arguments);
# "_x8": the same weights with x rounded to int8 for gate and up (integer dot products)
INT8_FORMATS = {bench: QUANT_FORMATS[name] for bench, name in (
    ("int8_b32", "int8"), ("int8_b64", "int8_b64"), ("int8_row", "int8_rows"),
    ("int8_rowcol", "int8_rowcol"))}


def random_mlp(shape_name: str, generator=None) -> tuple:
    """Float32 ``(gate [I, H], up [I, H], down [H, I])`` of a :data:`SHAPES` MLP, unit-variance
    outputs (scaled by 1/sqrt of the input size); ``generator`` a ``torch.Generator`` or None
    (torch's global one)."""
    hidden, inter = SHAPES[shape_name]
    return (torch.randn(inter, hidden, generator=generator) / hidden**0.5,
            torch.randn(inter, hidden, generator=generator) / hidden**0.5,
            torch.randn(hidden, inter, generator=generator) / inter**0.5)


def bytes_per_weight(fmt: str, row_length: int) -> float:
    """Bytes a kernel reads per weight of format ``fmt`` (a :data:`FORMATS` name) in rows of
    ``row_length`` (the scales counted, as ``byte_bound.with_int8_mlp`` counts them; the
    ``row_length`` output-channel scales of "int8_rowcol", read once per call whatever the
    density, are not a per-weight cost and not counted)."""
    base = fmt.removesuffix("_x8")
    if base in INT8_FORMATS:
        return int8_bytes_per_weight(INT8_FORMATS[base]["block"], row_length)
    return {"float32": 4.0, "bfloat16": 2.0}[base]


def format_weights(g32, u32, d32):
    """Every format's (gate, up, down_t) of one MLP, from float32 weights."""
    from sparselab._fast.quant import quantize_mlp_int8

    dt32 = d32.t().contiguous()
    out = {"float32": (g32, u32, dt32),
           "bfloat16": tuple(t.to(torch.bfloat16) for t in (g32, u32, dt32))}
    for name, kw in INT8_FORMATS.items():
        out[name] = out[name + "_x8"] = quantize_mlp_int8(g32, u32, dt32, **kw)
    return out


def bench_formats(rows: Rows, shape_name, threads, densities, reps, rng, extra_isa=("avx2",),
                  formats=FORMATS):
    """Both kernels on every weight format side by side (interleaved in one loop), with the
    dense baselines of each format: torch fp32 and bf16, and the by-index kernel over all
    neurons for int8 (the dense 8-bit MLP). ``extra_isa``: paths also timed for bf16 (to
    show what a CPU without AVX-512 BF16 gets; same memory system). ``formats``: a subset
    of :data:`FORMATS` (float32 always, as the reference of every speedup)."""
    unknown = set(formats) - set(FORMATS)
    if unknown:
        raise ValueError(f"unknown formats {sorted(unknown)}; known: {FORMATS}")
    formats = ("float32",) + tuple(f for f in FORMATS if f in formats and f != "float32")
    from sparselab._fast import isa

    hidden, inter = SHAPES[shape_name]
    g32, u32, d32 = random_mlp(shape_name)
    fw = format_weights(g32, u32, d32)
    x32 = torch.randn(1, hidden)
    best = isa.current()
    extra = [p for p in extra_isa if p in isa.supported() and p != best]
    all_idx = np.arange(inter)
    for nt in threads:
        torch.set_num_threads(nt)
        dense_mods = {f: (fw[f][0], fw[f][1], fw[f][2].t().contiguous())
                      for f in ("float32", "bfloat16")}
        for dens in densities:
            mask = random_mask(inter, dens, rng)
            idx = np.flatnonzero(mask)
            fns = {}
            for f in ("float32", "bfloat16"):
                g, u, d = dense_mods[f]
                xf = x32.to(g.dtype)
                fns[f"dense_torch/{f}"] = (lambda g=g, u=u, d=d, xf=xf:
                                           F.linear(F.silu(F.linear(xf, g)) * F.linear(xf, u), d))
            for f in formats:
                g, u, dt = fw[f]
                xf = x32.to(torch.bfloat16) if f == "bfloat16" else x32
                x8 = f.endswith("_x8")
                cache = _fast.WeightCache(g, u, down_t=dt)
                cache.update(mask)
                im = _fast.IndexedMLP(g, u, dt, "silu", nt, x_int8=x8)
                for path in [best] + (extra if f == "bfloat16" else []):
                    def run_isa(fn, path=path):
                        def call():
                            if path == best:
                                return fn()
                            with isa.use(path):
                                return fn()
                        return call
                    tag = f"{f}" if path == best else f"{f}@{path}"
                    fns[f"cache_kernel/{tag}"] = run_isa(
                        lambda c=cache, xf=xf, nt=nt, x8=x8: c.forward(xf, "silu", n_threads=nt,
                                                                       x_int8=x8))
                    fns[f"index_kernel/{tag}"] = run_isa(
                        lambda im=im, xf=xf, idx=idx: im(xf, idx))
                if f.startswith("int8") and not x8:
                    fns[f"dense_kernel/{f}"] = lambda im=im, xf=xf: im(xf, all_idx)
            # shuffled: in rotation the dense int8 kernel would always follow the by-index
            # kernel on the same weights and find them warmer
            t = interleaved(fns, reps, shuffle_seed=int(rng.integers(2**31)))
            med = {k: stats_ms(v)[0] for k, v in t.items()}
            for name, ns in t.items():
                m, q1, q3 = stats_ms(ns)
                method, tag = name.split("/")
                f = tag.split("@")[0]
                rows.add(section="formats", shape=shape_name, hidden=hidden, inter=inter,
                         dtype=f, isa=tag.split("@")[1] if "@" in tag else best, threads=nt,
                         density=dens, method=method, n_active=len(idx), median_ms=round(m, 4),
                         q1_ms=round(q1, 4), q3_ms=round(q3, 4), reps=reps,
                         bytes_per_weight=round(bytes_per_weight(f, hidden), 4),
                         speedup_vs_fp32_same_kernel=round(
                             med.get(f"{method}/float32", float("nan")) / m, 3))
            print(f"formats t={nt} d={dens}: " + ", ".join(
                f"{k} {v:.2f}" for k, v in med.items()), flush=True)
    torch.set_num_threads(max(threads))


def bench_ceiling(rows: Rows, shape_name, reps, rng, density: float = 0.3, batch: int = 16):
    """The by-index kernel's compute limit: at batch ``batch`` every weight row it loads
    from memory serves ``batch`` tokens from L1 (the kernels loop over the batch inside a
    group of rows), so weights processed per second there is what the instructions
    allow, with memory out of the way. Beside what the same kernel streams from DRAM at
    batch 1 (section "formats"), it says how much room a format has before its
    instructions limit it. One thread, each format in its own loop; medians of ``reps``
    calls after a warm-up."""
    hidden, inter = SHAPES[shape_name]
    g32, u32, d32 = random_mlp(shape_name)
    fw = format_weights(g32, u32, d32)
    x32 = torch.randn(batch, hidden)
    idx = np.flatnonzero(random_mask(inter, density, rng))
    for f in FORMATS:
        g, u, dt = fw[f]
        bpw = bytes_per_weight(f, hidden)
        im = _fast.IndexedMLP(g, u, dt, "silu", 1, x_int8=f.endswith("_x8"))
        xf = x32.to(torch.bfloat16) if f == "bfloat16" else x32
        for _ in range(3):
            im(xf, idx)
        ns = np.empty(reps, np.int64)
        for i in range(reps):
            t = time.perf_counter_ns()
            im(xf, idx)
            ns[i] = time.perf_counter_ns() - t
        m, q1, q3 = stats_ms(ns)
        processed = 3 * len(idx) * hidden * bpw * batch  # bytes of weights, once per token
        rows.add(section="ceiling", shape=shape_name, hidden=hidden, inter=inter, dtype=f,
                 threads=1, batch=batch, density=density, method="index_kernel",
                 n_active=len(idx), median_ms=round(m, 4), q1_ms=round(q1, 4),
                 q3_ms=round(q3, 4), reps=reps, bytes_per_weight=bpw,
                 gb_per_s=round(processed / (m * 1e6), 2))
        print(f"ceiling {f}: batch {batch}, {m:.3f} ms, {processed / (m * 1e6):.1f} GB/s "
              "of weights processed", flush=True)


def knob_sweep(shape: str, densities, threads, reps: int, formats, set_knob, values, default,
               column: str, seed: int = 0, batch: int = 1) -> list[dict]:
    """Both kernels on every format in ``formats`` with a kernel knob at each of ``values``,
    all interleaved in one loop per (threads, density), in a new random order every rep:
    every call sets the knob
    (``set_knob(value)``, e.g. ``_fast._mlp._set_prefetch``), then runs its kernel, so the
    settings are timed rep by rep. The knob is set back to ``default`` at the
    end, also on errors. ``batch``: tokens per call. Rows: shape, threads, density, format,
    kernel, ``column`` (the value), median and quartile ms, reps, batch.

        >>> rows = knob_sweep("llama3.2-3b", [0.3], [1], 21, ("float32",), _mlp._set_prefetch,
        ...                   (0, -1), -1, "ahead")
    """
    hidden, inter = SHAPES[shape]
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    fw = format_weights(*random_mlp(shape, gen))
    x32 = torch.randn(batch, hidden, generator=gen)
    rows = []
    try:
        for nt in threads:
            for dens in densities:
                mask = random_mask(inter, dens, rng)
                fns = _knob_fns(fw, formats, x32, mask, np.flatnonzero(mask), nt, set_knob, values)
                # a random order every rep: with rotation the second setting always follows
                # the first on the same weights and runs warmer
                for (f, kernel, value), ns in interleaved(fns, reps, shuffle_seed=seed).items():
                    med, q1, q3 = stats_ms(ns)
                    rows.append({"shape": shape, "threads": nt, "density": dens, "format": f,
                                 "kernel": kernel, column: value, "median_ms": med, "q1_ms": q1,
                                 "q3_ms": q3, "reps": reps, "batch": batch})
                print(f"threads {nt}, d = {dens}: done", flush=True)
    finally:
        set_knob(default)
    return rows


def _knob_fns(fw, formats, x32, mask, idx, threads: int, set_knob, values) -> dict:
    """(format, kernel, value) -> a call that sets the knob to value, then runs the kernel."""
    fns = {}
    for f in formats:
        g, u, dt = fw[f]
        xf = x32.to(torch.bfloat16) if f == "bfloat16" else x32
        cache = _fast.WeightCache(g, u, down_t=dt)
        cache.update(mask)
        indexed = _fast.IndexedMLP(g, u, dt, "silu", threads)
        kernels = {"cache_kernel": lambda c=cache, xf=xf: c.forward(xf, "silu", n_threads=threads),
                   "index_kernel": lambda m=indexed, xf=xf: m(xf, idx)}
        for kernel, run in kernels.items():
            for value in values:
                def call(run=run, value=value):
                    set_knob(value)
                    return run()
                fns[(f, kernel, value)] = call
    return fns


def run_sweep(name: str, doc: str, run, results: Path, argv=None, reps: int = 21):
    """The command line and output of a kernel sweep script (``experiments/bench_prefetch.py``,
    ``bench_huge_pages.py``): ``--shape``, ``--densities``, ``--threads``, ``--reps``;
    ``run(args)`` measures with torch on one thread (the kernels take their thread count
    per call) and returns ``(frame, markdown)``, written to ``results/<name>.{csv,md}``.

        >>> run_sweep("bench_prefetch", __doc__, lambda a: (df, md), RESULTS)
    """
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--shape", default=TARGET_SHAPE, choices=sorted(SHAPES))
    ap.add_argument("--densities", type=float, nargs="+", default=[0.1, 0.3, 0.5])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--reps", type=int, default=reps)
    args = ap.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        df, md = run(args)
    finally:
        torch.set_num_threads(threads)
    results.mkdir(exist_ok=True)
    df.to_csv(results / f"{name}.csv", index=False)
    (results / f"{name}.md").write_text(md)
    print(md)
    return df


def bench_update(rows: Rows, shapes, dtypes, densities, churns, reps, rng):
    torch.set_num_threads(1)
    for shape_name in shapes:
        hidden, inter = SHAPES[shape_name]
        for dtype in dtypes:
            gate = torch.randn(inter, hidden).to(dtype)
            up = torch.randn(inter, hidden).to(dtype)
            down = torch.randn(hidden, inter).to(dtype)
            down_t = down.t().contiguous()
            for dens in densities:
                m0 = random_mask(inter, dens, rng)
                n_act = int(m0.sum())
                idx_t = torch.from_numpy(np.flatnonzero(m0))
                cache_rows = _fast.WeightCache(gate, up, down_t=down_t, n_threads=1)
                fns = {"full_regather": regather_fn(gate, up, down_t, idx_t)}
                ks = {}
                for churn in churns:
                    k = max(1, round(churn * n_act))
                    ks[churn] = k
                    m1 = swap(m0, k, rng)
                    # one cache per method and churn, so every timed call is an exact k-swap
                    for mode, cache in (
                        ("rows", _fast.WeightCache(gate, up, down_t=down_t, n_threads=1)),
                        ("columns", _fast.WeightCache(gate, up, down, down_mode="columns",
                                                      n_threads=1)),
                    ):
                        cache.update(m0)
                        fns[f"update_{mode}_churn{churn}"] = toggler(cache, m0, m1)
                cache_rows.update(m0)
                t = interleaved(fns, reps)
                full = stats_ms(t["full_regather"])[0]
                for name, ns in t.items():
                    med, q1, q3 = stats_ms(ns)
                    churn = float(name.rsplit("churn", 1)[1]) if "churn" in name else ""
                    target = ""
                    if shape_name == TARGET_SHAPE and dtype == torch.float32 and dens == 0.3 \
                            and churn == 0.05 and name.startswith("update_rows"):
                        target = 10.0
                    sp = full / med
                    rows.add(section="update", shape=shape_name, hidden=hidden, inter=inter,
                             dtype=str(dtype).replace("torch.", ""), threads=1, density=dens,
                             churn=churn, method=name.split("_churn")[0],
                             neurons_swapped=ks.get(churn, ""), n_active=n_act,
                             median_ms=round(med, 4), q1_ms=round(q1, 4), q3_ms=round(q3, 4),
                             iqr_ms=round(q3 - q1, 4), reps=reps,
                             speedup_vs_regather=round(sp, 2), target=target,
                             target_met=(sp >= target) if target else "")
                print(f"update {shape_name} {dtype} d={dens}: regather {full:.2f} ms, "
                      + ", ".join(f"{n[7:]} {stats_ms(v)[0]:.3f}" for n, v in t.items()
                                  if n.startswith("update_rows")), flush=True)
                # memory: what the cache owns vs the active rows it holds
                slot = 3 * hidden * gate.element_size()
                rows.add(section="memory", shape=shape_name, hidden=hidden, inter=inter,
                         dtype=str(dtype).replace("torch.", ""), density=dens, n_active=n_act,
                         method="cache_down_t", extra_bytes=cache_rows.extra_bytes,
                         active_row_bytes=n_act * slot,
                         ratio=round(cache_rows.extra_bytes / (n_act * slot), 3),
                         mlp_bytes=3 * hidden * inter * gate.element_size())
            # fixed number of changed neurons at 10 % and 50 % active: cost must not follow
            # the active-set size
            k = 64
            fixed = {}
            for dens in (0.1, 0.5):
                m0 = random_mask(inter, dens, rng)
                m1 = swap(m0, k, rng)
                cache = _fast.WeightCache(gate, up, down_t=down_t, n_threads=1)
                cache.update(m0)
                fixed[dens] = toggler(cache, m0, m1)
            t = interleaved({f"d{d}": f for d, f in fixed.items()}, reps * 3)
            a, b = stats_ms(t["d0.1"])[0], stats_ms(t["d0.5"])[0]
            ratio = max(a, b) / min(a, b)
            for dens in (0.1, 0.5):
                med, q1, q3 = stats_ms(t[f"d{dens}"])
                rows.add(section="update_fixed_k", shape=shape_name, hidden=hidden, inter=inter,
                         dtype=str(dtype).replace("torch.", ""), threads=1, density=dens,
                         method="update_rows", neurons_swapped=k, median_ms=round(med, 4),
                         q1_ms=round(q1, 4), q3_ms=round(q3, 4), iqr_ms=round(q3 - q1, 4),
                         reps=reps * 3, ratio_50_vs_10=round(ratio, 3),
                         target=1.5 if shape_name == TARGET_SHAPE else "",
                         target_met=(ratio <= 1.5) if shape_name == TARGET_SHAPE else "")


def bench_mask_ops(rows: Rows, reps, rng):
    n = 8192
    for batch in (1, 4):
        for dens in (0.1, 0.3, 0.5):
            prev = _fast.pack(random_mask(n, dens, rng))
            batch_words = _fast.pack(np.stack([random_mask(n, dens, rng) for _ in range(batch)]))

            fns = {"xor_diff+union": lambda p=prev, b=batch_words: _fast.xor_diff(p, _fast.union(b)),
                   "xor_diff": lambda p=prev, b=batch_words: _fast.xor_diff(p, b[0]),
                   "union": lambda b=batch_words: _fast.union(b)}
            t = interleaved(fns, reps, warmup=50)
            for name, ns in t.items():
                med, q1, q3 = stats_ms(ns)
                us = med * 1000
                tgt = name == "xor_diff+union"
                rows.add(section="mask_ops", shape=f"{n} neurons", inter=n, density=dens,
                         batch=batch, method=name, median_us=round(us, 3),
                         q1_us=round(q1 * 1000, 3), q3_us=round(q3 * 1000, 3), reps=reps,
                         target=10.0 if tgt else "", target_met=(us < 10.0) if tgt else "")


def update_sweep(shape: str = "smollm2-135m", dtype=torch.float32,
                 densities=(0.05, 0.1, 0.3, 0.5), swaps=(1, 4, 16, 64, 256),
                 reps: int = 5, seed: int = 0) -> list[dict]:
    """Cache update cost vs neurons swapped and vs active size, next to a full re-gather.

        >>> import pandas as pd
        >>> df = pd.DataFrame(update_sweep(densities=(0.1, 0.5), swaps=(8, 64), reps=5))

    Importable (notebook 09). For each active density: a full re-gather of the active
    rows (the cost of having no cache: three contiguous row gathers) and, for each ``k``
    in ``swaps``, a ``WeightCache`` update swapping exactly ``k`` neurons out and ``k`` in
    (toggled back and forth, so every timed call is the same ``k``-swap), all densities
    interleaved rep by rep in one run, 1 thread. ``k`` larger than the active or the
    inactive set is skipped. One row per measurement: ``shape, hidden, inter, dtype,
    density, n_active, method`` (``update_rows`` / ``full_regather``), ``neurons_swapped``
    (0 for the re-gather),
    ``median_ms, q1_ms, q3_ms, reps`` and the structural cost of one call:
    ``rows_copied`` (neurons whose gate, up and down rows were written; from
    ``UpdateStats`` for the cache, ``n_active`` for the re-gather) and ``bytes_moved``.
    The torch thread count is restored on return.
    """
    hidden, inter = SHAPES[shape]
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    gate, up, down_t = (torch.randn(inter, hidden, generator=gen).to(dtype) for _ in range(3))
    slot_bytes = 3 * hidden * gate.element_size()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    fns, meta = {}, {}
    try:
        for dens in densities:
            m0 = random_mask(inter, dens, rng)
            n_act = int(m0.sum())
            fns[(dens, 0)] = regather_fn(gate, up, down_t, torch.from_numpy(np.flatnonzero(m0)))
            meta[(dens, 0)] = ("full_regather", n_act, n_act, n_act * slot_bytes)
            for k in swaps:
                if k > min(n_act, inter - n_act):
                    continue
                m1 = swap(m0, k, rng)
                cache = _fast.WeightCache(gate, up, down_t=down_t, n_threads=1)
                cache.update(m0)
                s = cache.update(m1)  # the structural cost of one k-swap, then back
                cache.update(m0)
                fns[(dens, k)] = toggler(cache, m0, m1)
                meta[(dens, k)] = ("update_rows", n_act, s.rows_copied, s.bytes_moved)
        # One interleaved run over every density and k: a change in the machine's load
        # during the sweep hits every cell alike instead of skewing one density's numbers.
        t = interleaved(fns, reps)
        out = []
        for (dens, k), ns in t.items():
            med, q1, q3 = stats_ms(ns)
            method, n_act, rows_copied, nbytes = meta[(dens, k)]
            out.append(dict(shape=shape, hidden=hidden, inter=inter,
                            dtype=str(dtype).replace("torch.", ""), density=dens,
                            n_active=n_act, method=method, neurons_swapped=k,
                            median_ms=round(med, 4), q1_ms=round(q1, 4), q3_ms=round(q3, 4),
                            reps=reps, rows_copied=rows_copied, bytes_moved=nbytes))
    finally:
        torch.set_num_threads(threads)
    return out
