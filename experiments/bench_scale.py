"""Peak memory and throughput of in-memory vs streamed (Zarr) recordings of SmolLM2.

    flock -x /tmp/sparselab-bench.lock python experiments/bench_scale.py \
        --tokens 10000 20000 100000 --full-corpus

Each (mode, token count) runs in a fresh subprocess (peak RSS = the child's ru_maxrss),
all 30 layers, ``h`` in fp16:

- ``memory``: ``sl.record(...)`` holding the trace (skipped above ``--memory-max`` tokens:
  it needs ~2x the trace in RAM);
- ``streamed``: ``sl.record(..., out=store)``, the same arrays written to a Zarr store;
- ``streamed+masks``: as ``streamed``, plus packed TopK(0.5) masks beside h.

``memory`` and ``streamed`` record the same arrays of the same texts, so their throughput
ratio is the cost of streaming; ``streamed+masks`` also computes masks. Passages of the
shipped corpus are taken in order until the token count is reached (max_length 256,
batch 8), cycling through the corpus again past its ~82k tokens. ``--full-corpus`` then
records every passage once, untruncated (max_length 1024), with masks, and runs the
whole-trace analysis (``studies.scale.analyze``: calibrated density, churn, window
reuse, ...) on the store, in the same process. Results:
experiments/results/bench_scale.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
MODES = ("memory", "streamed", "streamed+masks")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _texts(tok, corpus, tokens: int, max_length: int) -> list[str]:
    lengths = [len(ids) for ids in tok(corpus, truncation=True, max_length=max_length)["input_ids"]]
    texts, total, i = [], 0, 0
    while total < tokens:
        texts.append(corpus[i % len(corpus)])
        total += lengths[i % len(corpus)]
        i += 1
    return texts


def child(mode: str, tokens: int, max_length: int, batch_size: int) -> dict:
    import torch

    import sparselab as sl
    from sparselab.studies.scale import memory_profile

    torch.set_num_threads(2)
    model, tok = sl.load_model()
    corpus = sl.load_corpus()
    full = mode == "full-corpus"
    texts = corpus if full else _texts(tok, corpus, tokens, max_length)
    rss_model = _peak_rss_mb()
    out = Path(tempfile.mkdtemp(prefix="bench_scale_")) / "run.zarr"
    kwargs = dict(max_length=max_length, batch_size=batch_size, store=("h",), progress=False)
    if mode != "memory":
        kwargs["out"] = out
    if mode in ("streamed+masks", "full-corpus"):
        kwargs["masks"] = sl.rules.TopK(keep=0.5)
    t0 = time.perf_counter()
    trace, profile = memory_profile(lambda: sl.record(model, tok, texts, **kwargs), interval=0.5)
    seconds = time.perf_counter() - t0
    early = profile[profile.seconds <= 0.2 * seconds].rss_mb.max()  # first fifth of the run
    late = profile[profile.seconds >= 0.8 * seconds].rss_mb.max()   # last fifth
    row = {"mode": mode, "target_tokens": tokens, "tokens": trace.n_tokens, "texts": len(texts),
           "distinct_texts": len(set(texts)), "seconds": seconds, "tokens_per_s": trace.n_tokens / seconds,
           "peak_rss_mb": _peak_rss_mb(), "rss_after_model_load_mb": rss_model,
           "rss_mb_first_fifth": float(early), "rss_mb_last_fifth": float(late),
           "store_mb": sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**20 if out.exists() else 0}
    if full:
        from sparselab.studies.scale import analyze

        del trace
        t0 = time.perf_counter()
        result = analyze(sl.Trace.open(out), sl.rules.Calibrated(density=0.5))
        row["analysis_seconds"] = time.perf_counter() - t0
        row["peak_rss_mb_with_analysis"] = _peak_rss_mb()
        row["analysis"] = {
            "density_mean": float(result["density"]["density"].mean()),
            "churn_mean": float(result["churn"]["churn"].mean()),
            "window_new_fraction_k4_mean": float(result["window_reuse"].query("window == 4")["new_fraction"].mean()),
        }
    shutil.rmtree(out.parent, ignore_errors=True)
    return row


def _run_child(mode: str, tokens: int, max_length: int, batch_size: int) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, str(tokens), "--max-length", str(max_length),
           "--batch-size", str(batch_size)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
    if done.returncode != 0:
        raise RuntimeError(f"{mode} {tokens} failed:\n{done.stderr[-3000:]}")
    row = json.loads(done.stdout.strip().splitlines()[-1])
    print(row, flush=True)
    return row


def _markdown(meta: dict, rows: list[dict], tokens: list[int]) -> str:
    lines = ["# Recording memory: in memory vs streamed to Zarr (SmolLM2-135M, 30 layers, h fp16)", "",
             f"`{meta['command']}` ({meta['measured_at']}, 2 torch threads, {meta['cpu_count']} cores). "
             "`memory` and `streamed` record the same arrays (h) of the same texts; `streamed+masks` also "
             "packs TopK(0.5) masks beside h. Peak RSS is the child process's maximum resident set; the "
             "first / last fifth columns are the largest RSS sampled (every 0.5 s) in the first and last "
             "fifth of the recording's time. "
             "Past the corpus's ~82k tokens (max_length 256) passages repeat (see `distinct texts`).", "",
             "| tokens | mode | texts (distinct) | peak RSS MB | RSS after model load MB | max RSS first / last fifth MB "
             "| tokens/s | store MB |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r["mode"] == "full-corpus":
            continue
        lines.append(f"| {r['tokens']} | {r['mode']} | {r['texts']} ({r['distinct_texts']}) | {r['peak_rss_mb']:.0f} "
                     f"| {r['rss_after_model_load_mb']:.0f} | {r['rss_mb_first_fifth']:.0f} / {r['rss_mb_last_fifth']:.0f} "
                     f"| {r['tokens_per_s']:.0f} | {r['store_mb']:.0f} |")
    lines += ["", "Throughput against the in-memory recording of the same texts: median of the interleaved "
              "repeats, and the range of the per-repeat ratios.", "",
              "| tokens | repeats | streamed / in-memory | range | streamed+masks / in-memory | range |",
              "|---:|---:|---:|---|---:|---|"]
    for t in tokens:
        speed = {m: [r["tokens_per_s"] for r in rows if r["mode"] == m and r["target_tokens"] == t] for m in MODES}
        if not speed["memory"]:
            continue
        cells = []
        for mode in ("streamed", "streamed+masks"):
            per = [s / m for s, m in zip(speed[mode], speed["memory"], strict=True)]
            cells += [f"{statistics.median(speed[mode]) / statistics.median(speed['memory']):.2f}",
                      f"{min(per):.2f}-{max(per):.2f}"]
        lines.append(f"| {t} | {len(speed['memory'])} | {' | '.join(cells)} |")
    by = {(r["mode"], r["target_tokens"]): r for r in rows}
    streamed = sorted((r for r in rows if r["mode"] == "streamed+masks"), key=lambda r: r["tokens"])
    if len(streamed) >= 2 and streamed[-1]["target_tokens"] != streamed[0]["target_tokens"]:
        small = [r["peak_rss_mb"] for r in streamed if r["target_tokens"] == streamed[0]["target_tokens"]]
        lo, hi = statistics.median(small), streamed[-1]["peak_rss_mb"]
        lines += ["", f"Peak RSS of a streamed recording (h + masks) from {streamed[0]['tokens']} tokens (median of "
                  f"{len(small)} runs: {', '.join(f'{x:.0f}' for x in small)} MB) to {streamed[-1]['tokens']} tokens: "
                  f"{lo:.0f} -> {hi:.0f} MB ({100 * (hi / lo - 1):+.1f} %)."]
    full = by.get(("full-corpus", 0))
    if full:
        a = full["analysis"]
        lines += ["", "## The whole shipped corpus, recorded and analysed", "",
                  f"Every passage ({full['texts']}, untruncated at max_length 1024: {full['tokens']} tokens), "
                  f"h + TopK(0.5) masks to Zarr in {full['seconds']:.0f} s ({full['store_mb']:.0f} MB on disk), "
                  f"then `analyze(Trace.open(store), Calibrated(density=0.5))` in {full['analysis_seconds']:.0f} s. "
                  f"Peak RSS {full['peak_rss_mb']:.0f} MB recording, {full['peak_rss_mb_with_analysis']:.0f} MB "
                  f"with the analysis. Mean over layers: density {a['density_mean']:.3f}, churn "
                  f"{a['churn_mean']:.3f}, new neurons per token with a 4-token window {a['window_new_fraction_k4_mean']:.3f} of the layer."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[10000, 20000, 100000])
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--memory-max", type=int, default=30000,
                        help="largest token count recorded in memory (default 30000)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="interleaved repeats of each mode where memory runs too (default 3)")
    parser.add_argument("--full-corpus", action="store_true", help="also record and analyse the whole corpus")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "TOKENS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if any(t < 1 for t in args.tokens) or args.max_length < 1 or args.batch_size < 1:
        parser.error("--tokens, --max-length and --batch-size must be >= 1")
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.max_length, args.batch_size)))
        return
    import sparselab as sl

    rows = []
    for tokens in args.tokens:
        modes = [m for m in MODES if m != "memory" or tokens <= args.memory_max]
        # the throughput comparison: modes interleaved, rotating which goes first
        repeats = args.repeats if "memory" in modes else 1
        for repeat in range(repeats):
            for mode in modes[repeat % len(modes):] + modes[: repeat % len(modes)]:
                rows.append({**_run_child(mode, tokens, args.max_length, args.batch_size), "repeat": repeat})
    if args.full_corpus:
        rows.append(_run_child("full-corpus", 0, 1024, args.batch_size))
    RESULTS.mkdir(exist_ok=True)
    command = (f"python experiments/bench_scale.py --tokens {' '.join(map(str, args.tokens))} "
               f"--repeats {args.repeats}")
    meta = {"command": command + (" --full-corpus" if args.full_corpus else ""),
            "versions": sl.versions(), "cpu_count": os.cpu_count(),
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (RESULTS / "bench_scale.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (RESULTS / "bench_scale.md").write_text(_markdown(meta, rows, args.tokens))


if __name__ == "__main__":
    main()
