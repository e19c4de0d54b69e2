"""A streamed recording of SmolLM2 killed with SIGKILL mid-run, resumed, and compared with
an uninterrupted run, bit for bit.

    flock -x /tmp/sparselab-bench.lock python experiments/bench_resume.py

Three child processes with the same settings (2 torch threads, the first ``--texts``
passages of the shipped corpus, max_length 256, batch 8, all 30 layers, h in fp16 with
packed TopK(0.5) masks): (1) the uninterrupted run to ``ref.zarr``; (2) the same run to
``killed.zarr``, SIGKILLed once the store has committed ``--kill-after`` passages (while
the next batch is being computed and written); (3) ``record(..., resume=True)`` on
``killed.zarr``. Then every token field, every value of h and every mask word of the
resumed store are compared with the reference. Results:
experiments/results/bench_resume.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def child(out: str, texts: int, resume: bool) -> None:
    import torch

    import sparselab as sl

    torch.set_num_threads(2)
    model, tok = sl.load_model()
    t0 = time.perf_counter()
    trace = sl.record(model, tok, sl.load_corpus(n=texts), max_length=256, batch_size=8, store=("h",),
                      out=out, resume=resume, masks=sl.rules.TopK(keep=0.5), progress=False)
    print(json.dumps({"seconds": time.perf_counter() - t0, "tokens": trace.n_tokens}))


def _spawn(out: Path, texts: int, resume: bool = False) -> subprocess.Popen:
    cmd = [sys.executable, __file__, "--child", str(out), "--texts", str(texts)] + (["--resume"] if resume else [])
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=os.environ)


def _finish(proc: subprocess.Popen) -> dict:
    out, _ = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"child failed with {proc.returncode}")
    return json.loads(out.strip().splitlines()[-1])


def _committed(store: Path) -> int:
    try:
        attrs = json.loads((store / "zarr.json").read_text())["attributes"]
        return len(attrs["progress"]["passages"])
    except (OSError, KeyError, ValueError):
        return 0


def _compare(ref_path: Path, got_path: Path) -> dict:
    import numpy as np

    import sparselab as sl
    from sparselab.recording import TOKEN_FIELDS

    ref, got = sl.Trace.open(ref_path), sl.Trace.open(got_path)
    same = {"n_tokens": ref.n_tokens == got.n_tokens}
    if not same["n_tokens"]:
        return same
    same["token_fields"] = all(np.array_equal(getattr(ref, f), getattr(got, f)) for f in TOKEN_FIELDS)
    same["h"] = all(bool((ref.activations(layer) == got.activations(layer)).all()) for layer in ref.layers)
    same["masks"] = bool(np.array_equal(ref.stored_masks().bits, got.stored_masks().bits))
    same["pieces"] = ref.pieces == got.pieces
    return same


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=48)
    parser.add_argument("--kill-after", type=int, default=16, help="committed passages before the kill")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--resume", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.texts, args.resume)
        return
    if not 0 < args.kill_after < args.texts - 8:
        parser.error("--kill-after must leave at least one batch (8 passages) after it")
    import sparselab as sl

    work = Path(tempfile.mkdtemp(prefix="bench_resume_"))
    try:
        ref = _finish(_spawn(work / "ref.zarr", args.texts))
        killed = work / "killed.zarr"
        proc = _spawn(killed, args.texts)
        t0 = time.perf_counter()
        while _committed(killed) < args.kill_after and proc.poll() is None:
            time.sleep(0.05)
        time.sleep(0.5)  # inside the next batch's forward and writes
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        killed_after = time.perf_counter() - t0
        partial = sl.Trace.open(killed)
        at_kill = {"passages": len(partial.progress["passages"]), "tokens": partial.n_tokens,
                   "complete": bool(partial.progress["complete"]),
                   "partial_files": len(list(killed.rglob("*.partial")))}
        resumed = _finish(_spawn(killed, args.texts, resume=True))
        same = _compare(work / "ref.zarr", killed)
        leftovers = len(list(killed.rglob("*.partial")))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    meta = {"command": f"python experiments/bench_resume.py --texts {args.texts} --kill-after {args.kill_after}",
            "versions": sl.versions(), "cpu_count": os.cpu_count(),
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    result = {"meta": meta, "reference": ref, "killed_after_seconds": killed_after, "at_kill": at_kill,
              "resumed": resumed, "equal": same, "partial_files_after_resume": leftovers}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_resume.json").write_text(json.dumps(result, indent=1))
    verdict = "equal" if all(same.values()) else "DIFFERENT"
    lines = [
        "# SIGKILL mid-recording, resume, compare (SmolLM2-135M, 30 layers, h fp16 + TopK(0.5) masks)", "",
        f"`{meta['command']}` ({meta['measured_at']}, 2 torch threads).", "",
        "| run | tokens | seconds |", "|---|---:|---:|",
        f"| uninterrupted | {ref['tokens']} | {ref['seconds']:.1f} |",
        f"| killed (SIGKILL after {killed_after:.1f} s) | {at_kill['tokens']} committed "
        f"({at_kill['passages']} passages) | - |",
        f"| resumed | {resumed['tokens']} | {resumed['seconds']:.1f} |", "",
        f"At the kill the store was readable (`Trace.open`), not complete, with "
        f"{at_kill['partial_files']} interrupted temporary files; after the resume {leftovers}. "
        f"Resumed against uninterrupted: **{verdict}** ("
        + ", ".join(f"{k}: {'same' if v else 'different'}" for k, v in same.items()) + ").",
    ]
    (RESULTS / "bench_resume.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
