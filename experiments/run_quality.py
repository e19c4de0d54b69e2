"""Quality cost of sparsity on the embedded SmolLM2-135M: perplexity, KL to dense and greedy
agreement for the oracle, static and predicted modes at MLP densities 10 % to 90 %.

    python experiments/run_quality.py                      # ~10 min on 2 cores, first run
    python experiments/run_quality.py --texts 8 --densities 0.3 0.5 0.7   # a quick look

Everything comes from ``sl.evaluate`` on held-out passages of the corpus (every 4th
passage, ``sl.corpus.split``); the predictors are the ones the ``smollm2_135m`` benchmark
config trains on the training passages (cached after the first run), the static sets are
the most frequent neurons of a recording of training passages, and the oracle is the
rule's true per-token mask. Writes ``experiments/results/quality_smollm2.csv`` (the tidy
frame), ``.json`` (frame, config, model identity and versions) and ``.md`` (the table
the README quotes).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import pandas as pd
import torch

import sparselab as sl
from sparselab.evaluation import suite

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
CONFIG = HERE / "configs" / "smollm2_135m.json"
DENSITIES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--texts", type=int, default=16, help="held-out passages scored")
    ap.add_argument("--max_length", type=int, default=256, help="tokens per passage")
    ap.add_argument("--densities", type=float, nargs="+", default=list(DENSITIES))
    ap.add_argument("--n_prompts", type=int, default=4, help="prompts for greedy agreement")
    ap.add_argument("--n_generate", type=int, default=24, help="tokens generated per prompt")
    ap.add_argument("--static_texts", type=int, default=32, help="training passages for static sets")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    return ap.parse_args(argv)


def describe(predictors: dict) -> str:
    """One line for the predictors' JSON description (the full one is in the .json file)."""
    training = predictors.get("training", {})
    ranks = sorted(set(predictors.get("ranks", {}).values()))
    rule = predictors.get("rule", {})
    return (f"rank {'/'.join(map(str, ranks))}, labels {rule.get('name')}({rule.get('density')}) on "
            f"|{rule.get('source')}|, loss {training.get('loss')}, {training.get('epochs')} epochs on "
            f"{training.get('n_tokens')} training tokens ({training.get('n_sequences')} passages), "
            f"{predictors.get('bytes', 0) / 2**20:.1f} MiB")


def markdown(df: pd.DataFrame, meta: dict) -> str:
    """Perplexity (and its change vs dense), KL and agreement, one row per density."""
    dense = float(df.loc[df["mode"] == "dense", "perplexity"].iloc[0])
    lines = ["# Quality of sparse SmolLM2-135M (held-out text)", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items()]
    lines += ["", f"Dense perplexity: **{dense:.3f}**. Cells: perplexity (change vs dense) / "
              "mean KL(dense || sparse) per token / greedy agreement over the generated tokens.", ""]
    modes = [m for m in ("oracle", "predicted", "static") if m in set(df["mode"])]
    lines += ["| density | " + " | ".join(modes) + " |", "|---|" + "---|" * len(modes)]
    for density in sorted(df.loc[df["mode"] != "dense", "density"].unique()):
        cells = []
        for mode in modes:
            row = df[(df["mode"] == mode) & (df["density"] == density)]
            if row.empty:
                cells.append("")
                continue
            r = row.iloc[0]
            change = r["perplexity"] / dense - 1.0
            cells.append(f"{r['perplexity']:.2f} ({change:+.1%}) / {r['kl']:.3f} / "
                         f"{r['greedy_agreement']:.0%}")
        lines.append(f"| {density:.0%} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> pd.DataFrame:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model, tokenizer = sl.load_model()
    config = suite.load_config(CONFIG)
    predictors, _ = suite.trained_predictors(model, tokenizer, config["predictors"])
    train, held_out = sl.corpus.split(sl.load_corpus(), held_out=0.25)
    # static sets from training passages the predictors did not see either way
    static_trace = sl.record(model, tokenizer, train[: args.static_texts], max_length=128,
                             store=("h",))
    texts = held_out[: args.texts]
    df = sl.evaluate(model, tokenizer, texts, predictors=predictors, densities=args.densities,
                     max_length=args.max_length, n_generate=args.n_generate,
                     n_prompts=args.n_prompts, static_trace=static_trace)
    meta = {"command": " ".join(["python experiments/run_quality.py", *(argv or sys.argv[1:])]),
            "held-out passages": len(texts), "tokens scored": int(df["n_tokens"].iloc[0]),
            "predictors": describe(df.attrs["config"]["predictors"]),
            "oracle rule": df.attrs["config"]["rule"],
            "static sets": f"most frequent neurons over {args.static_texts} training passages",
            "torch threads": torch.get_num_threads(), "wall time s": round(time.perf_counter() - t0, 1)}
    args.out.mkdir(parents=True, exist_ok=True)
    df.to_csv(args.out / "quality_smollm2.csv", index=False)
    payload = {"meta": meta, "config": df.attrs["config"], "model": df.attrs["model"],
               "versions": df.attrs["versions"], "rows": df.to_dict(orient="records")}
    (args.out / "quality_smollm2.json").write_text(json.dumps(payload, indent=1, default=str))
    (args.out / "quality_smollm2.md").write_text(markdown(df, meta))
    print(markdown(df, meta))
    return df


if __name__ == "__main__":
    main()
