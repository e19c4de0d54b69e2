"""The bytes frontier of every selection method on both embedded models.

    flock -x /tmp/sparselab-bench.lock python experiments/run_frontier.py            # both, ~30 min
    python experiments/run_frontier.py --model smollm2 --n-held 4 --quick           # a smoke run
    python experiments/run_frontier.py --model smollm2 --only shadow,shadow-cal --tag shadow
    python experiments/run_frontier.py --model smollm2 --only shadow,shadow-cal --x-bits 8 --tag shadow_x8

Per model: the corpus is split (``sl.corpus.split``, every 4th passage held out); a trace
of the first ``--n-train`` training passages (256 tokens each, ``h``, ``gate``, ``mlp_in``)
fits every threshold and trains the rank-64 low-rank predictors (``--epochs``); the first
``--n-held`` held-out passages (256 tokens each) are scored by :func:`sparselab.frontier`
(teacher-forced perplexity, KL to dense, MLP weight bytes read per token / dense, the
method's own weights included). Methods: oracle top-k |h| (not realizable), shadow 4-bit
(group 64), TEAL, WINA, CATS, trained low-rank, two-stage (trained superset -> top |h|);
``-cal`` variants of shadow, TEAL and WINA replace the per-token top-k by a per-layer
threshold calibrated on the training trace (same mean share, a count that varies by token).

Writes ``experiments/results/frontier_<model>.csv`` (one row per method and point) and
``.md`` (the table, the smallest bytes within +5 % and +2 %, fit times, config, versions).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import sparselab as sl
from sparselab.evaluation.frontier import smallest_bytes
from sparselab.evaluation.suite_report import _md_table
from sparselab.prediction import methods as M

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
MODELS = {"smollm2": None, "gemma3": "gemma3-270m"}


def method_grid(predictors, quick: bool, x_bits: int | None = None) -> list:
    if quick:
        return [M.Oracle(0.5), M.Shadow(0.45), M.TEAL(0.7, 0.5), M.CATS(0.7)]
    grid = [M.Oracle(d) for d in (0.4, 0.5, 0.6)]
    grid += [M.Shadow(d, x_bits=x_bits) for d in (0.4, 0.45, 0.5, 0.55, 0.6)]
    grid += [M.TEAL(x, h) for x, h in ((0.7, 0.5), (0.8, 0.5), (0.8, 0.6))]
    grid += [M.WINA(x, h) for x, h in ((0.7, 0.5), (0.8, 0.5), (0.8, 0.6))]
    grid += [M.Shadow(d, calibrated=True, x_bits=x_bits) for d in (0.4, 0.45, 0.5, 0.55, 0.6)]
    grid += [M.TEAL(x, h, calibrated=True) for x, h in ((0.7, 0.5), (0.8, 0.5))]
    grid += [M.WINA(x, h, calibrated=True) for x, h in ((0.7, 0.5), (0.8, 0.5))]
    grid += [M.CATS(d) for d in (0.5, 0.7)]
    if predictors is not None:
        grid += [M.Predicted(predictors, d) for d in (0.5, 0.7, 0.8)]
        grid += [M.TwoStage(predictors, superset=s, keep=k) for s, k in ((0.7, 0.5), (0.8, 0.5))]
    return grid


def to_markdown(df, fit: dict, title: str) -> str:
    cols = ["method", "point", "bytes_share", "perplexity", "ppl_vs_dense", "kl", "greedy_agreement",
            "fit_seconds"]
    table = df[cols].copy()
    table["ppl_vs_dense"] = (100 * table.ppl_vs_dense).map(lambda v: f"{v:+.2f} %")
    lines = [f"# {title}", "", _md_table(table, index=False, digits=4), ""]
    for loss in (0.05, 0.02):
        best = smallest_bytes(df, loss)
        lines += [f"Smallest bytes share within +{loss:.0%} perplexity:", "",
                  _md_table(best, index=False, digits=3), ""]
    lines += ["Fit / training:", "", "```", json.dumps(fit, indent=1), "```", "",
              "Config:", "", "```", json.dumps(df.attrs["config"], indent=1, default=str)[:6000], "```",
              "", "Versions: `" + json.dumps(df.attrs["versions"]) + "`", ""]
    return "\n".join(lines)


def run(key: str, args) -> None:
    model, tokenizer = sl.load_model(MODELS[key]) if MODELS[key] else sl.load_model()
    train, held_out = sl.corpus.split(sl.load_corpus(), held_out=0.25)
    t0 = time.perf_counter()
    trace = sl.record(model, tokenizer, train[: args.n_train], max_length=256,
                      store=("h", "gate", "mlp_in"))
    fit = {"train_passages": args.n_train, "train_tokens": int(trace.n_tokens),
           "record_seconds": round(time.perf_counter() - t0, 1)}
    predictors = None
    only = set(args.only.split(",")) if args.only else None
    if not args.quick and (only is None or only & {"predicted", "two-stage"}):
        t0 = time.perf_counter()
        predictors = sl.train_predictors(trace, rank=64, epochs=args.epochs)
        fit["predictors"] = {"rank": 64, "epochs": args.epochs, "loss": "mass",
                             "seconds": round(time.perf_counter() - t0, 1),
                             "seconds_per_layer": round((time.perf_counter() - t0) / trace.n_layers, 2)}
    grid = [m for m in method_grid(predictors, args.quick, args.x_bits) if only is None or m.name in only]
    df = sl.frontier(model, tokenizer, grid, held_out[: args.n_held],
                     train_trace=trace, max_length=256, model_name=key)
    fit["threads"] = torch.get_num_threads()
    RESULTS.mkdir(exist_ok=True)
    suffix = ("_quick" if args.quick else "") + (f"_{args.tag}" if args.tag else "")
    df.to_csv(RESULTS / f"frontier_{key}{suffix}.csv", index=False)
    title = (f"Bytes frontier, {key}: {args.n_held} held-out passages, {int(df.n_tokens[0])} tokens, "
             f"dense perplexity {df.perplexity[0]:.3f}")
    (RESULTS / f"frontier_{key}{suffix}.md").write_text(to_markdown(df, fit, title))
    print(to_markdown(df, fit, title))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=[*MODELS, "both"], default="both")
    ap.add_argument("--n-train", type=int, default=32)
    ap.add_argument("--n-held", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--quick", action="store_true", help="four methods, no trained predictors")
    ap.add_argument("--only", default="", help="comma-separated method names (e.g. shadow,shadow-cal)")
    ap.add_argument("--x-bits", type=int, default=None, choices=[8],
                    help="shadow methods score with int8 x (what the compiled decode step runs)")
    ap.add_argument("--tag", default="", help="suffix of the result files (frontier_<model>_<tag>)")
    args = ap.parse_args()
    torch.manual_seed(0)
    for key in (MODELS if args.model == "both" else [args.model]):
        run(key, args)


if __name__ == "__main__":
    main()
