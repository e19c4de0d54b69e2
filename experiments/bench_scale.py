"""Peak memory and throughput of in-memory vs streamed (Zarr) recordings of SmolLM2.

    flock -x /tmp/sparselab-bench.lock python experiments/bench_scale.py --tokens 2000 4000 8000

Each (mode, token count) runs in a fresh subprocess (peak RSS = the child's ru_maxrss),
all 30 layers, ``h`` in fp16: ``memory`` is ``sl.record(...)`` holding the trace,
``streamed`` is ``sl.record(..., out=store, masks=TopK(0.5))`` writing h and packed masks
to a Zarr store. Passages of the shipped corpus are taken in order until the token
count is reached (max_length 256, batch 8). Results: experiments/results/bench_scale.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def child(mode: str, tokens: int, max_length: int, batch_size: int) -> dict:
    import torch

    import sparselab as sl

    torch.set_num_threads(2)
    model, tok = sl.load_model()
    texts, total = [], 0
    lengths = tok(sl.load_corpus(), truncation=True, max_length=max_length)["input_ids"]
    for text, ids in zip(sl.load_corpus(), lengths, strict=True):
        if total >= tokens:
            break
        texts.append(text)
        total += len(ids)
    rss_model = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = Path(tempfile.mkdtemp(prefix="bench_scale_")) / "run.zarr"
    t0 = time.perf_counter()
    if mode == "memory":
        trace = sl.record(model, tok, texts, max_length=max_length, batch_size=batch_size, store=("h",),
                          progress=False)
    else:
        trace = sl.record(model, tok, texts, max_length=max_length, batch_size=batch_size, store=("h",),
                          progress=False, out=out, masks=sl.rules.TopK(keep=0.5))
    seconds = time.perf_counter() - t0
    n = trace.n_tokens
    disk = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) if out.exists() else 0
    shutil.rmtree(out.parent, ignore_errors=True)
    return {"mode": mode, "target_tokens": tokens, "tokens": n, "texts": len(texts), "seconds": seconds,
            "tokens_per_s": n / seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rss_after_model_load_mb": rss_model, "store_mb": disk / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[2000, 4000, 8000])
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
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
        for mode in ("memory", "streamed"):
            cmd = [sys.executable, __file__, "--child", mode, str(tokens), "--max-length",
                   str(args.max_length), "--batch-size", str(args.batch_size)]
            done = subprocess.run(cmd, capture_output=True, text=True, check=True, env=os.environ)
            row = json.loads(done.stdout.strip().splitlines()[-1])
            print(row, flush=True)
            rows.append(row)
    RESULTS.mkdir(exist_ok=True)
    meta = {"command": "python experiments/bench_scale.py --tokens " + " ".join(map(str, args.tokens)),
            "versions": sl.versions(), "cpu_count": os.cpu_count(),
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (RESULTS / "bench_scale.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = ["# Recording memory: in memory vs streamed to Zarr (SmolLM2-135M, 30 layers, h fp16)", "",
             f"`{meta['command']}` ({meta['measured_at']}, 2 torch threads; streamed also stores packed "
             "TopK(0.5) masks). Peak RSS is the child process's maximum resident set.", "",
             "| tokens | mode | peak RSS MB | RSS after model load MB | tokens/s | store MB |",
             "|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['tokens']} | {r['mode']} | {r['peak_rss_mb']:.0f} | {r['rss_after_model_load_mb']:.0f} "
                     f"| {r['tokens_per_s']:.0f} | {r['store_mb']:.0f} |")
    by = {(r["mode"], r["target_tokens"]): r for r in rows}
    lines += ["", "| tokens | streamed / in-memory throughput |", "|---:|---:|"]
    for t in args.tokens:
        lines.append(f"| {t} | {by[('streamed', t)]['tokens_per_s'] / by[('memory', t)]['tokens_per_s']:.2f} |")
    (RESULTS / "bench_scale.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
