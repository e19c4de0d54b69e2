"""MLP weights on disk under a memory cap: dense vs direct vs cache (window k) decode speed,
bytes read from storage per token, and memory, each run in its own capped process.

    flock -x /tmp/sparselab-bench.lock python experiments/bench_disk.py            # SmolLM2
    flock -x /tmp/sparselab-bench.lock python experiments/bench_disk.py --shapes 3b  # Llama-3.2-3B shapes
    python experiments/bench_disk.py --quick --out /tmp/bench_disk                   # a smoke run

``--shapes 3b``: a random-weight model of Llama-3.2-3B's shapes (hidden 3072, intermediate
8192, SiLU, fp32; ``experiments/configs/llama_skip_causal_3b.json`` with ``--layers`` of its
28 layers, 8 by default: a 2.25 GiB MLP file), masks from
:class:`sparselab.prediction.SyntheticActivationMasks` (top-k of a synthetic activation
whose token-to-token reuse was fitted to SmolLM2's trained predictors) with the cost of a
rank-327 random low-rank predictor (its scores are computed each step, then discarded);
runs: the 50 % cap (dense, direct, cache with k = 1 and 4) and dense all in RAM.

Per run, a fresh Python process joins a fresh memory cgroup (no limit yet), loads the model
and its predictors, sparsifies it with ``weight_file=`` (the MLP weights leave RAM; dense is
``mode="static"`` with every neuron, reading the whole file per token), frees the heap,
drops the weight file's pages, and only then caps its cgroup at
``base + cap * MLP file bytes`` where ``base`` is what the cgroup is charged at that point
(Python, torch, the non-MLP weights). So ``cap`` is the share of the MLP weights that fits in RAM
beside everything else, whether as page cache or as cache rows. Then a prefill, ``warmup``
decode steps and ``tokens`` timed decode steps; per step: wall time and ``read_bytes`` from
``/proc/self/io`` (page-cache hits do not count). A run the kernel kills for want of memory
is reported with ``killed=True`` (the cache's rows are anonymous memory: they cannot be
evicted, so a cap below them kills the process).

Results: ``<out>.csv`` (one row per run), ``<out>.json`` (rows + config + versions),
``<out>.md`` (a table).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
CONFIG = Path(__file__).resolve().parent / "configs" / "smollm2_135m.json"
CONFIG_3B = Path(__file__).resolve().parent / "configs" / "llama_skip_causal_3b.json"


# ------------------------------------------------------------------------------ worker

def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _cache_capacity_bytes(handle) -> int:
    """Bytes of the weight caches' slot buffers (capacity, not just the rows held)."""
    if handle is None or not handle.caches:
        return 0
    return int(sum(getattr(c, "cache", c).capacity * getattr(c, "cache", c)._slot_bytes
                   for c in handle.caches.values()))


def _overflow_rows(handle) -> int:
    """Rows a capacity-bounded cache computed from the file so far (beyond its capacity)."""
    if handle is None:
        return 0
    return int(sum(getattr(c, "overflow_rows", 0) for c in handle.caches.values()))


def model_3b(config: dict, layers: int):
    """The random-weight Llama-3.2-3B-shaped model of ``config`` with ``layers`` layers
    (seeded: the same weights in every process, so the weight file's fingerprints match)."""
    from sparselab.models.random import build_random_llama

    return build_random_llama(dict(config["model"], num_hidden_layers=int(layers)))


def predictors_3b(config: dict, layers: int, density: float):
    """Synthetic-activation masks at ``density`` carrying the cost of the config's random
    low-rank predictors (rank 327: their scores computed, then discarded)."""
    from sparselab.prediction import RandomLowRankPredictors, SyntheticActivationMasks

    shape = config["model"]["llama_config"]
    hidden, n = int(shape["hidden_size"]), int(shape["intermediate_size"])
    pspec = config["predictors"]
    cost = RandomLowRankPredictors(hidden=hidden, n_neurons=n, layers=range(layers), rank=pspec["rank"],
                                   density=density, seed=int(pspec.get("seed", 0)))
    return SyntheticActivationMasks(n, hidden, range(layers), density=density, seed=0, cost=cost)


def worker(spec: dict) -> dict:
    """One run, in this (fresh) process; ``spec['cgroup']`` is the cgroup it is in."""
    import numpy as np
    import torch

    import sparselab as sl
    from sparselab.evaluation.memory import release_memory
    from sparselab.evaluation.storage import StorageCounter, memory_footprint
    from sparselab.evaluation.suite import load_config, make_prompt, trained_predictors
    from sparselab.runtime.weight_file import MLPWeightFile, make_resident

    torch.set_num_threads(spec["threads"])
    variant, density = spec["variant"], spec["density"]
    predictors = None
    if spec.get("shapes", "smollm2") == "3b":
        config = load_config(CONFIG_3B)
        model, tokenizer = model_3b(config, spec["layers"]), None
        prompt = make_prompt(config, None, model.config.vocab_size)
        if variant in ("direct", "cache", "cache_ram", "direct_ram"):
            predictors = predictors_3b(config, spec["layers"], density)
    else:
        config = load_config(CONFIG)
        model, tokenizer = sl.load_model()
        model.eval()
        prompt = make_prompt(config, tokenizer, model.config.vocab_size)
        if variant in ("direct", "cache", "cache_ram", "direct_ram"):
            predictors, _ = trained_predictors(model, tokenizer, config["predictors"], progress=False,
                                               log=lambda s: None)
            predictors = predictors.with_policy(target_density=density)
    # the prompt is tokenized: the tokenizer is no part of the model that decodes, in any
    # variant (loading SmolLM2's costs ~117 MB of anonymous memory; deleting it gives back
    # ~28 MB, the allocator keeps the rest)
    del tokenizer
    wf = MLPWeightFile(spec["weight_file"], advice=spec["advice"]) if not variant.endswith("_ram") else None
    n_layers = len(model.model.layers)
    n = model.config.intermediate_size
    if variant == "dense":
        handle = sl.sparsify(model, mode="static", static_neurons={i: np.arange(n) for i in range(n_layers)},
                             weight_file=wf)
    elif variant in ("direct", "cache"):
        handle = sl.sparsify(model, predictors, mode="predicted", use_cache=variant == "cache",
                             cache_window=spec["window"], weight_file=wf,
                             cache_capacity=spec.get("capacity") if variant == "cache" else None)
    elif variant in ("direct_ram", "cache_ram"):
        handle = sl.sparsify(model, predictors, mode="predicted", use_cache=variant == "cache_ram",
                             cache_window=spec["window"])
    else:  # dense_ram: the model as loaded
        handle = None
    # the rest of the model (everything still in the safetensors mapping: attention,
    # embeddings, norms; every weight for the *_ram variants) copied to anonymous memory:
    # resident and charged here, never evicted by the cap and re-read as if on disk
    make_resident(model)
    release_memory()
    if wf is not None:
        wf.drop_pages()
    cg = Path(spec["cgroup"])
    # what this cgroup is charged now: anonymous memory (Python, torch, the non-MLP weights
    # as loaded) and page cache this process read first; file pages another process read
    # first (the shared model file) are charged to that process's group, not here
    base = int((cg / "memory.usage_in_bytes").read_text())
    limit = None
    if spec["cap"] is not None and wf is not None:
        limit = int(base + spec["cap"] * wf.nbytes)
        (cg / "memory.limit_in_bytes").write_text(str(limit))
    (cg / "memory.max_usage_in_bytes").write_text("0")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM

    over0 = 0
    step_ms, step_read, step_anon, step_charged, step_cap, step_foot = [], [], [], [], [], []
    foot0 = memory_footprint(wf)
    with torch.no_grad(), StorageCounter() as pre_io:
        t0 = time.perf_counter()
        out = model(input_ids=prompt, use_cache=True)
        prefill_s = time.perf_counter() - t0
    past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
    tokens = [int(tok)]
    if handle is not None:
        handle.reset_stats()
    for step in range(spec["warmup"] + spec["tokens"]):
        with torch.no_grad(), StorageCounter() as io:
            t0 = time.perf_counter()
            out = model(input_ids=tok, past_key_values=past, use_cache=True)
            past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
            dt = time.perf_counter() - t0
        tokens.append(int(tok))
        # where the memory goes, per step (for a run the cap kills: the trace up to the kill
        # is in stderr)
        step_anon.append(_status_kb("RssAnon"))
        step_charged.append(int((cg / "memory.usage_in_bytes").read_text()))
        step_cap.append(_cache_capacity_bytes(handle))
        if step == spec["warmup"] - 1:
            over0 = _overflow_rows(handle)
        step_foot.append(memory_footprint(wf)["total"])
        if spec.get("trace"):
            print(f"TRACE step={step} anon={step_anon[-1]} charged={step_charged[-1]} "
                  f"cache_capacity={step_cap[-1]}", file=sys.stderr, flush=True)
        if step >= spec["warmup"]:
            step_ms.append(dt * 1e3)
            step_read.append(io.read_bytes)
    res = {"base_charged": base, "base_rss": _status_kb("VmRSS"), "limit": limit, "prefill_s": prefill_s, "prefill_read_bytes": pre_io.read_bytes,
           "ms_per_token": float(np.median(step_ms)), "ms_per_token_mean": float(np.mean(step_ms)),
           "tok_s": 1e3 / float(np.mean(step_ms)),
           "read_mb_per_token": float(np.mean(step_read)) / 2**20,
           "rss_end": _status_kb("VmRSS"), "rss_peak": _status_kb("VmHWM"),
           "rss_anon_end": _status_kb("RssAnon"),
           "weight_resident_end": wf.resident_bytes() if wf is not None else None,
           "mlp_file_bytes": wf.nbytes if wf is not None else None,
           "cgroup_peak": int((cg / "memory.max_usage_in_bytes").read_text()),
           "failcnt": int((cg / "memory.failcnt").read_text()), "tokens": tokens,
           "step_anon": step_anon, "step_charged": step_charged, "step_cache_capacity_bytes": step_cap,
           "step_footprint": step_foot, "footprint_start": foot0["total"],
           # RSS + the weight file's resident pages, each page once (memory_footprint), the
           # highest after any step; rss_peak is the kernel's high-water mark (VmHWM)
           "footprint_peak": max(step_foot + [foot0["total"]]),
           "overflow_per_token": (_overflow_rows(handle) - over0) / spec["tokens"] if handle is not None else None}
    if handle is not None:
        st = handle.stats()
        dec = st[(st.phase == "decode") & (st.step >= spec["warmup"])]
        per_step = dec.groupby("step")
        res["measured_density"] = float(dec.density.mean())
        res["rows_loaded_per_token"] = float(per_step.added.sum().mean()) if variant.startswith("cache") else None
        caches = handle.caches
        res["rows_held"] = int(sum(c.n_active for c in caches.values())) if caches else None
        res["cache_bytes"] = int(handle.extra_bytes) if caches else None
        inner = [getattr(c, "cache", c) for c in caches.values()]
        res["cache_headroom"] = float(inner[0]._headroom) if inner else None
        res["cache_grows"] = int(sum(c.totals["grows"] for c in inner)) if inner else None
    return res


# ------------------------------------------------------------------------------ driver

def runs_for(args) -> list[dict]:
    """The runs, most telling first (a sweep cut short keeps the headline): the first cap
    (dense, direct, cache per density), the in-RAM references, the window sweep, other caps."""
    def rows(cap):  # a capped cache holds at most cache_fill of the cap's MLP share
        return None if cap is None else round(cap * args.cache_fill, 4)

    def capped(cap):
        out = [{"variant": "dense", "density": 1.0, "cap": cap, "window": 1, "advice": "normal"}]
        for d in args.densities:
            out.append({"variant": "direct", "density": d, "cap": cap, "window": 1, "advice": "random"})
            out += [{"variant": "cache", "density": d, "cap": cap, "window": k, "advice": "random",
                     "capacity": rows(cap)} for k in args.cache_windows]
        return out

    runs = capped(args.caps[0])
    if args.shapes == "3b":  # the headline cap and the all-in-RAM reference only
        return runs + [{"variant": "dense_ram", "density": 1.0, "cap": None, "window": 1, "advice": "-"}]
    d = max(args.densities)  # the same model all in RAM, no cap: the reference points
    runs += [{"variant": v, "density": dd, "cap": None, "window": 1, "advice": "-"}
             for v, dd in (("dense_ram", 1.0), ("direct_ram", d), ("cache_ram", d))]
    for d, wcap in zip(args.densities, args.window_caps, strict=True):
        runs += [{"variant": "cache", "density": d, "cap": wcap, "window": k, "advice": "random",
                  "capacity": rows(wcap)} for k in args.windows if k != 1]
    for cap in args.caps[1:]:
        runs += capped(cap)
    return runs


def prepare_file(path: Path, shapes: str = "smollm2", layers: int = 8) -> None:
    import sparselab as sl
    from sparselab.evaluation.suite import load_config
    from sparselab.runtime.weight_file import write_mlp_file

    if shapes == "3b":
        model = model_3b(load_config(CONFIG_3B), layers)
    else:
        model, _ = sl.load_model()
    write_mlp_file(model, path)


def write(rows: list[dict], args, found) -> None:
    """The results so far: ``<out>.csv``, ``.json`` (rows, config, versions) and ``.md``."""
    import pandas as pd

    import sparselab as sl
    from sparselab.evaluation.suite_report import _md_table

    df = pd.DataFrame(rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    df.drop(columns=["tokens"], errors="ignore").to_csv(out.with_suffix(".csv"), index=False)
    meta = {"config": vars(args) | {"cgroup": found[0]}, "versions": sl.versions(),
            "machine": {"cpus": os.cpu_count()}, "rows": rows}
    out.with_suffix(".json").write_text(json.dumps(meta, indent=1, default=str))
    cols = ["variant", "density", "cap", "capacity", "window", "tok_s", "read_mb_per_token",
            "rows_loaded_per_token", "overflow_per_token", "rows_held", "rss_peak", "footprint_peak",
            "cgroup_peak", "weight_resident_end", "killed"]
    table = df.reindex(columns=cols).copy()
    for c in ("rss_peak", "footprint_peak", "cgroup_peak", "weight_resident_end"):
        table[c] = (table[c] / 2**20).round(1)
    what = (f"Llama-3.2-3B MLP shapes, {args.layers} layers, random fp32 weights, synthetic-activation masks"
            if args.shapes == "3b" else "SmolLM2-135M, trained predictors")
    out.with_suffix(".md").write_text(
        f"# bench_disk ({what}; {found[0]} cgroup, {args.threads} thread(s), {args.tokens} timed decode tokens "
        f"after max({args.warmup}, k) warm-up)\n\nCommand: `{args.command}`\n\n"
        "MB columns are MiB; cap = share of the MLP file that fits "
        "beside the rest of the process.\n\n" + _md_table(table, index=False) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", choices=("smollm2", "3b"), default="smollm2",
                    help="smollm2: SmolLM2-135M with trained predictors; 3b: Llama-3.2-3B shapes, random "
                         "weights, synthetic-activation masks (other defaults change with it, see the docstring)")
    ap.add_argument("--layers", type=int, default=8, help="--shapes 3b: how many of the 28 layers")
    ap.add_argument("--out", default=None, help="default results/bench_disk_smollm2 or results/bench_disk_3b")
    ap.add_argument("--weight-file", default=None,
                    help="default /tmp/sparselab-disk/smollm2_135m.mlpw or llama3b_<layers>L.mlpw")
    ap.add_argument("--densities", type=float, nargs="+", default=[0.3, 0.5])
    ap.add_argument("--caps", type=lambda s: None if s == "none" else float(s), nargs="+",
                    default=None, help="memory caps (share of the MLP file), the first is the headline "
                                       "(default 0.5 none 0.35; 0.5 with --shapes 3b)")
    ap.add_argument("--cache-windows", type=int, nargs="+", default=None,
                    help="cache windows k measured at each cap (default 1; 1 4 with --shapes 3b)")
    ap.add_argument("--windows", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--window-caps", type=lambda s: None if s == "none" else float(s), nargs="+",
                    default=[0.5, None], help="the cap of the window sweep, one per density")
    ap.add_argument("--cache-fill", type=float, default=0.75,
                    help="under a cap, each layer's cache holds at most cache_fill x cap of its neurons "
                         "(buffers allocated once); the rest of the cap is the decode's working memory and "
                         "page cache")
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--warmup", type=int, default=8, help="decode steps before timing (at least k)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="two runs, few tokens")
    ap.add_argument("--rerun", nargs="+", default=None,
                    help="re-measure only runs matching e.g. variant=cache (comma-separated key=value), "
                         "replacing them in --out")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.command = " ".join(["python", "experiments/bench_disk.py"] + sys.argv[1:])
    three = args.shapes == "3b"
    if args.out is None:
        args.out = str(RESULTS / ("bench_disk_3b" if three else "bench_disk_smollm2"))
    if args.weight_file is None:
        args.weight_file = (f"/tmp/sparselab-disk/llama3b_{args.layers}L.mlpw" if three
                            else "/tmp/sparselab-disk/smollm2_135m.mlpw")
    if args.caps is None:
        args.caps = [0.5] if three else [0.5, None, 0.35]
    if args.cache_windows is None:
        args.cache_windows = [1, 4] if three else [1]
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return

    from tqdm.auto import tqdm

    from sparselab.evaluation.cgroup import MemoryCap, cgroup_version

    found = cgroup_version()
    if found is None:
        sys.exit("no memory cgroup here: bench_disk needs Linux cgroups (v1 or v2) and root")
    wpath = Path(args.weight_file)
    if not wpath.is_file():
        wpath.parent.mkdir(parents=True, exist_ok=True)
        prepare_file(wpath, args.shapes, args.layers)
    runs = runs_for(args)
    if args.quick:
        args.tokens, args.warmup = 4, 2
        runs = [r for r in runs if r["cap"] == 0.5 and r["window"] == 1][:3]
    rows = []
    if args.rerun:  # measure again the runs matching --rerun, keep the other rows of --out
        prev = Path(args.out).with_suffix(".json")
        old = json.loads(prev.read_text())["rows"] if prev.is_file() else []
        want = [r for r in runs if any(all(str(r[k]) == v for k, v in (kv.split("=") for kv in sel.split(",")))
                                       for sel in args.rerun)]
        keys = {(r["variant"], r["density"], r["cap"], r["window"]) for r in want}
        rows = [r for r in old if (r["variant"], r["density"], r["cap"], r["window"]) not in keys]
        runs = want
    for run in tqdm(runs, desc="bench_disk"):
        # a window of k tokens fills over k steps: warm up at least that long
        spec = dict(run, weight_file=str(wpath), tokens=args.tokens, warmup=max(args.warmup, run["window"]),
                    threads=args.threads, shapes=args.shapes, layers=args.layers)
        with MemoryCap(None) as cap:
            spec["cgroup"] = str(cap.path)
            env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], env=env,
                                  capture_output=True, text=True, preexec_fn=cap.preexec)
            wall = time.perf_counter() - t0
            failcnt = cap.failcnt
        row = {k: run.get(k) for k in ("variant", "density", "cap", "window", "advice", "capacity")}
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode == 0 and line:
            row.update(json.loads(line[-1][7:]), killed=False)
        else:
            row.update(killed=proc.returncode in (-9, 137), returncode=proc.returncode,
                       failcnt=failcnt, error=proc.stderr.strip().splitlines()[-1:] if proc.stderr else None)
        row["wall_s"] = wall
        rows.append(row)
        write(rows, args, found)  # after every run: a cut-short sweep keeps what it measured
        tqdm.write(f"{row['variant']:>10} d={row['density']} cap={row['cap']} k={row['window']}: "
                   + ("KILLED" if row.get("killed") else f"{row.get('tok_s', float('nan')):.2f} tok/s, "
                      f"{row.get('read_mb_per_token', float('nan')):.1f} MB read/token"))
    write(rows, args, found)
    print(Path(args.out).with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
