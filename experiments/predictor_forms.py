"""What limits the predictors: their linear form, their inputs, or their training?

    flock -x /tmp/sparselab-bench.lock python experiments/predictor_forms.py     # ~5 min

SmolLM2-135M, layers 2 / 10 / 20: scores fitted on the first 32 training passages
(256 tokens each), scored on the first 16 held-out passages (``sl.corpus.split``) by the
share of ``|h|`` mass their top half keeps per token (the oracle keeps the most):
the library's trained rank-64 predictor; closed-form reduced-rank regression on
``sqrt|h|`` (rank 64), also with the previous token's input appended; a nonlinear
predictor ``x -> width -> ReLU -> neurons`` trained with the same loss and optimizer at
width 64 and 1024; and the 4-bit shadow of gate and up
(:mod:`sparselab.studies.selection_scores`).

Writes ``experiments/results/predictor_forms.csv`` and ``.md``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

import sparselab as sl
from sparselab._version import versions
from sparselab.evaluation.suite_report import _md_table
from sparselab.studies.selection_scores import compare_scores

RESULTS = Path(__file__).resolve().parent / "results"
LAYERS = (2, 10, 20)


def main() -> None:
    torch.manual_seed(0)
    model, tokenizer = sl.load_model()
    train, held_out = sl.corpus.split(sl.load_corpus(), held_out=0.25)
    store = ("h", "mlp_in")
    tr = sl.record(model, tokenizer, train[:32], max_length=256, layers=LAYERS, store=store)
    te = sl.record(model, tokenizer, held_out[:16], max_length=256, layers=LAYERS, store=store)
    df = compare_scores(model, tr, te, LAYERS, rank=64, density=0.5, epochs=8, wide=1024)
    RESULTS.mkdir(exist_ok=True)
    df.to_csv(RESULTS / "predictor_forms.csv", index=False)
    table = df.pivot(index="score", columns="layer", values="mass_kept")
    table["mean"] = table.mean(1)
    secs = df.groupby("score").fit_seconds.mean().rename("fit s / layer")
    table = table.join(secs).sort_values("mean", ascending=False)
    md = [f"# Held-out |h| mass kept by each score's top 50 % (SmolLM2-135M; {tr.n_tokens} training "
          f"tokens, {te.n_tokens} held-out tokens)", "", _md_table(table, digits=4), "",
          "Command: `flock -x /tmp/sparselab-bench.lock python experiments/predictor_forms.py`", "",
          "Versions: `" + json.dumps(versions()) + "`", ""]
    (RESULTS / "predictor_forms.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
