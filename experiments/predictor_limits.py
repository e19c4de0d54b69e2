"""Two ways to close the predicted-mode quality gap on SmolLM2-135M that did not pay.

    python experiments/predictor_limits.py data          # ~6 min on 2 cores
    python experiments/predictor_limits.py allocation    # ~10 min on 2 cores

``data``: does more training text help the rank-64 predictors? Predictors for three
layers are trained as the ``smollm2_135m`` benchmark config trains them (Calibrated(0.5)
labels on |h|, mass loss, 4 epochs), once on its 240 passages cut at 128 tokens and once
on every training passage of the corpus cut at 512 tokens (about twice the tokens). The
measure is the share of |h| mass that the top half of each token's predicted scores keeps
on 16 held-out passages, next to the oracle's share (top half of |h| itself).

``allocation``: does a per-layer density budget beat a uniform one at the same mean?
Each layer's sensitivity is the mean KL(dense || sparse) on 8 training passages the
predictors did not see when only that layer runs predicted at 30/50/70/90 % density
(``sl.evaluate``). The budget (mean 50 %, each layer one of 30/50/70/90/100 %) that
minimises the summed sensitivities is found exactly by dynamic programming, and held-out
perplexity is compared with uniform 50 % (``sl.evaluate`` again, 16 held-out passages).
Per-layer densities are not a library policy (they did not pay), so the script sets the
per-layer thresholds on a copy of the predictors itself.

Writes ``experiments/results/predictor_limits_<study>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

import sparselab as sl
from sparselab._version import versions
from sparselab.evaluation import suite
from sparselab.prediction import train_predictors

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
CONFIG = HERE / "configs" / "smollm2_135m.json"
DATA_LAYERS = (2, 10, 20)
SENSITIVITY_DENSITIES = (0.3, 0.5, 0.7, 0.9)
BUDGET_CHOICES = (0.3, 0.5, 0.7, 0.9, 1.0)


def top_half_mass(scores: torch.Tensor, h: torch.Tensor) -> float:
    """Share of sum |h| kept by each token's top half of ``scores``."""
    k = h.shape[1] // 2
    keep = torch.zeros_like(h, dtype=torch.bool).scatter_(1, scores.topk(k, dim=1).indices, True)
    return float((h.abs() * keep).sum() / h.abs().sum())


def study_data(model, tokenizer, spec: dict) -> tuple[list[dict], dict]:
    train, held_out = sl.corpus.split(sl.load_corpus(), held_out=0.25)
    test = sl.record(model, tokenizer, held_out[:16], max_length=256, store=("mlp_in", "h"),
                     layers=DATA_LAYERS)
    rows = []
    for n_texts, max_length in ((int(spec["train_texts"]), int(spec["max_length"])), (len(train), 512)):
        trace = sl.record(model, tokenizer, train[:n_texts], max_length=max_length,
                          store=("mlp_in", "h"), layers=DATA_LAYERS)
        rule = sl.rules.rule_from_dict(spec["rule"])
        predictors = train_predictors(trace, rule=rule, rank=spec["rank"], epochs=int(spec["epochs"]),
                                      seed=int(spec["seed"]), loss=spec["loss"])
        for layer in DATA_LAYERS:
            h = test.activations(layer).float()
            rows.append({"train_passages": n_texts, "max_length": max_length,
                         "train_tokens": trace.n_tokens, "layer": layer,
                         "mass_kept": top_half_mass(predictors.scores(layer, test.mlp_inputs(layer).float()), h),
                         "oracle_mass_kept": top_half_mass(h.abs(), h)})
        del trace
    return rows, {"layers": list(DATA_LAYERS), "held_out_passages": 16, "held_out_tokens": test.n_tokens}


def best_budget(sensitivity: np.ndarray, choices: tuple[float, ...], mean: float) -> list[float]:
    """Per-layer densities from ``choices`` with the given mean minimising the summed
    sensitivity (``sensitivity[layer, choice]``), by dynamic programming over the total."""
    units = [round(c * 10) for c in choices]
    target = round(mean * 10 * sensitivity.shape[0])
    best: dict[int, tuple[float, list[float]]] = {0: (0.0, [])}
    for layer in range(sensitivity.shape[0]):
        nxt: dict[int, tuple[float, list[float]]] = {}
        for total, (cost, picks) in best.items():
            for j, u in enumerate(units):
                if total + u > target:
                    continue
                cand = (cost + sensitivity[layer, j], picks + [choices[j]])
                if total + u not in nxt or cand[0] < nxt[total + u][0]:
                    nxt[total + u] = cand
        best = nxt
    return best[target][1]


def study_allocation(model, tokenizer, spec: dict, predictors) -> tuple[list[dict], dict]:
    train, held_out = sl.corpus.split(sl.load_corpus(), held_out=0.25)
    n_train = int(spec["train_texts"])
    calibration = train[n_train : n_train + 8]  # training split, unseen by the predictors
    n_layers = len(predictors.layers)
    modes = {f"layer{layer}": (lambda d, layer=layer: {"mode": "predicted", "predictors": predictors,
                                                       "density": d, "layers": [layer]})
             for layer in predictors.layers}
    df = sl.evaluate(model, tokenizer, calibration, modes=("dense",), densities=SENSITIVITY_DENSITIES,
                     max_length=128, n_prompts=0, n_generate=0, extra_modes=modes)
    sensitivity = np.zeros((n_layers, len(BUDGET_CHOICES)))  # density 1.0 costs nothing
    for i, layer in enumerate(predictors.layers):
        for j, d in enumerate(SENSITIVITY_DENSITIES):
            sensitivity[i, j] = float(df[(df["mode"] == f"layer{layer}") & (df["density"] == d)]["kl"].iloc[0])
    budget = best_budget(sensitivity, BUDGET_CHOICES, 0.5)
    allocated = predictors.with_policy(target_density=0.5)
    for layer, d in zip(predictors.layers, budget, strict=True):
        # a copy: the thresholds dict is its own; density 1.0 keeps every neuron
        allocated.thresholds[layer] = (float("-inf") if d >= 1.0 else
                                       predictors.with_policy(target_density=d).thresholds[layer])
    quality = sl.evaluate(model, tokenizer, held_out[:16], predictors=predictors,
                          modes=("dense", "predicted"), densities=(0.5,), max_length=256,
                          n_prompts=0, n_generate=0,
                          extra_modes={"allocated": lambda d: {"mode": "predicted", "predictors": allocated}})
    rows = [{"layer": layer, "budget_density": d,
             **{f"kl_at_{c:g}": float(sensitivity[i, j]) for j, c in enumerate(SENSITIVITY_DENSITIES)}}
            for i, (layer, d) in enumerate(zip(predictors.layers, budget, strict=True))]
    dense = float(quality.loc[quality["mode"] == "dense", "perplexity"].iloc[0])
    summary = {"dense_perplexity": dense}
    for mode in ("predicted", "allocated"):
        r = quality[quality["mode"] == mode].iloc[0]
        summary[f"{mode}_perplexity"] = float(r["perplexity"])
        summary[f"{mode}_change"] = float(r["perplexity"]) / dense - 1.0
        summary[f"{mode}_kl"] = float(r["kl"])
    summary.update(calibration_passages=len(calibration), held_out_passages=16,
                   mean_budget=float(np.mean(budget)))
    return rows, summary


def markdown(study: str, rows: list[dict], summary: dict, command: str) -> str:
    lines = [f"# Predictor limits: {study}", "", f"- command: `{command}`"]
    lines += [f"- {k}: {v:.4g}" if isinstance(v, float) else f"- {k}: {v}" for k, v in summary.items()]
    lines += ["", "| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    for r in rows:
        lines.append("| " + " | ".join(f"{v:.4f}" if isinstance(v, float) else str(v) for v in r.values()) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("study", choices=("data", "allocation"))
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model, tokenizer = sl.load_model()
    spec = suite.load_config(CONFIG)["predictors"]
    if args.study == "data":
        rows, summary = study_data(model, tokenizer, spec)
    else:
        predictors, _ = suite.trained_predictors(model, tokenizer, spec)
        rows, summary = study_allocation(model, tokenizer, spec, predictors)
    summary["wall_time_s"] = round(time.perf_counter() - t0, 1)
    summary["torch_threads"] = torch.get_num_threads()
    command = " ".join(["python experiments/predictor_limits.py", *(argv or sys.argv[1:])])
    args.out.mkdir(parents=True, exist_ok=True)
    payload = {"study": args.study, "command": command, "summary": summary, "rows": rows,
               "predictor_spec": spec, "versions": versions()}
    (args.out / f"predictor_limits_{args.study}.json").write_text(json.dumps(payload, indent=1))
    text = markdown(args.study, rows, summary, command)
    (args.out / f"predictor_limits_{args.study}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
