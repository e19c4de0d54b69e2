"""Quality of int8 MLP weights on the embedded model, with ``sl.evaluate``.

    python experiments/quality_int8.py            # ~5-10 min on 2 cores

Rows (all scored against the fp32 dense model on the same held-out tokens):
``int8_dense`` / ``int8_rows_dense`` (every neuron, int8 weights with per-block-32 /
per-row scales), ``int8_oracle`` (top-k oracle masks on the int8 model) next to the fp32
``oracle`` rows. Writes experiments/results/quality_int8.{csv,md}. Target: int8 dense
within +1 % perplexity of fp32 dense.
"""

from __future__ import annotations

import json
from pathlib import Path

from sparselab.rules import TopK

import sparselab as sl

RESULTS = Path(__file__).resolve().parent / "results"
DENSITIES = (0.3, 0.5)


def main():
    model, tok = sl.load_model()
    texts = sl.load_corpus()[-8:]  # the corpus tail: never used to fit anything here
    n_layers = model.config.num_hidden_layers
    n = model.config.intermediate_size
    every = {i: list(range(n)) for i in range(n_layers)}

    def dense_int8(weights):
        return lambda d: {"mode": "static", "static_neurons": every, "weights": weights}

    df = sl.evaluate(model, tok, texts, densities=DENSITIES, modes=("dense", "oracle"),
                     n_generate=16, n_prompts=4, extra_modes={
                         "int8_dense": dense_int8("int8"),
                         "int8_rows_dense": dense_int8("int8_rows"),
                         "int8_oracle": lambda d: {"mode": "oracle", "rule": TopK(d),
                                                   "weights": "int8"},
                     })
    # a dense-every-neuron row does not depend on the density: keep one
    df = df[~(df["mode"].str.endswith("_dense") & (df["density"] != DENSITIES[0]))].copy()
    df.loc[df["mode"].str.endswith("_dense"), "density"] = 1.0
    base = float(df.loc[df["mode"] == "dense", "perplexity"].iloc[0])
    df["ppl_vs_fp32_dense_pct"] = (100 * (df["perplexity"] / base - 1)).round(3)
    RESULTS.mkdir(exist_ok=True)
    df.to_csv(RESULTS / "quality_int8.csv", index=False)
    lines = ["# int8 MLP weights: quality on the embedded model (sl.evaluate)", "",
             f"- model: {json.dumps(df.attrs.get('model'), default=str)}",
             f"- texts: {len(texts)} held-out corpus passages (the corpus tail), "
             "teacher-forced per-token prefill; KL(fp32 dense || row) per token",
             f"- versions: {json.dumps(df.attrs.get('versions'), default=str)}",
             "- command: `python experiments/quality_int8.py`", "",
             "| mode | density | perplexity | vs fp32 dense | KL | greedy agreement |",
             "|---|---|---|---|---|---|"]
    for r in df.itertuples():
        lines.append(f"| {r.mode} | {r.density:.0%} | {r.perplexity:.3f} | "
                     f"{r.ppl_vs_fp32_dense_pct:+.2f} % | {r.kl:.4f} | {r.greedy_agreement:.3f} |")
    (RESULTS / "quality_int8.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
