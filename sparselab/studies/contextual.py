"""Contextual vs static sparsity (Deja Vu): per-token masks against fixed neuron sets.

    >>> train, test = sl.corpus.split(sl.load_corpus(n=16))
    >>> train_trace = sl.record(model, tokenizer, train, max_length=128, store=("h",))
    >>> df = sl.studies.contextual.contextual_vs_static(model, tokenizer, test[:4], train_trace)
    >>> df.pivot(index="density", columns="mode", values="perplexity")

Three ways to keep a share ``d`` of each MLP's neurons, scored by perplexity and KL to the
dense model on held-out text (:func:`sparselab.evaluate`, teacher forced, every token its
own mask):

- ``"oracle"`` - *contextual*: every token keeps its own top ``d`` neurons by ``|h|``
  (``TopK(d)``, the best any per-token predictor with that rule could do);
- ``"static"`` - the ``d`` share of neurons most often in that top set on *training* text
  (:func:`sparselab.prediction.static_from_trace`), the same set for every token;
- ``"random"`` - a fixed random set of the same size per layer (seeded).

Deja Vu's claim: contextual sparsity keeps quality at densities where any fixed set
fails; the static set is the fair fixed competitor (it knows which neurons are busy), the
random one shows how much of that is worth.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from sparselab._checks import check_fraction

__all__ = ["LABELS", "contextual_vs_static", "mass_kept_by_mode", "random_mode", "random_sets"]

LABELS = {
    "dense": "dense",
    "oracle": "contextual (per-token top-k)",
    "static": "static (most frequent on training text)",
    "random": "random fixed set",
}


def random_sets(layers: Sequence[int], n_neurons: int, density: float, seed: int = 0) -> dict[int, np.ndarray]:
    """A random neuron set of ``round(density * n_neurons)`` neurons per layer, sorted int64.

        >>> random_sets([0, 1], 1536, 0.25)[0].shape
        (384,)

    Each layer draws its own set from a generator seeded by ``(seed, layer)``, so the set
    of a layer does not depend on which other layers are asked for.
    """
    density = check_fraction("density", density)
    if n_neurons < 1:
        raise ValueError(f"n_neurons must be >= 1, got {n_neurons}")
    k = max(1, int(round(density * n_neurons)))
    out = {}
    for layer in layers:
        rng = np.random.default_rng([int(seed), int(layer)])
        out[int(layer)] = np.sort(rng.choice(n_neurons, size=k, replace=False)).astype(np.int64)
    return out


def random_mode(layers: Sequence[int], n_neurons: int, seed: int = 0) -> Callable[[float], dict[str, Any]]:
    """``density -> sl.sparsify kwargs`` of the random fixed sets, for ``sl.evaluate(extra_modes=)``.

        >>> sl.evaluate(model, tok, texts, extra_modes={"random": random_mode(range(30), 1536)})
    """
    layers = [int(x) for x in layers]

    def make(density: float) -> dict[str, Any]:
        return {"mode": "static", "static_neurons": random_sets(layers, n_neurons, density, seed)}

    return make


def contextual_vs_static(
    model,
    tokenizer,
    texts: Sequence[str],
    train_trace,
    densities: Sequence[float] = (0.1, 0.25, 0.5),
    max_length: int = 128,
    seed: int = 0,
    progress: bool = True,
    **evaluate_kwargs: Any,
) -> pd.DataFrame:
    """Perplexity and KL of contextual, static and random masks on held-out ``texts``.

        >>> df = contextual_vs_static(model, tokenizer, test[:4], train_trace, densities=(0.25, 0.5))

    ``train_trace``: a recording (with ``h``) of *training* text - the static sets are
    chosen on it, and ``texts`` must not overlap it. Returns the frame of
    :func:`sparselab.evaluate` (modes ``dense, oracle, static, random``) with a ``label``
    column naming each mode for legends. Greedy agreement is skipped by default
    (``n_generate=0``); pass ``n_generate=`` to get it.
    """
    from sparselab.evaluation.quality import evaluate
    from sparselab.masking.rules import TopK

    if "h" not in train_trace.arrays:
        raise KeyError(f"train_trace has no 'h' array (recorded: {sorted(train_trace.arrays)})")
    evaluate_kwargs.setdefault("n_generate", 0)
    df = evaluate(
        model, tokenizer, texts, densities=densities, modes=("dense", "oracle", "static"),
        rule_factory=TopK, max_length=max_length, static_trace=train_trace, progress=progress,
        extra_modes={"random": random_mode(train_trace.layers, train_trace.n_neurons, seed)},
        **evaluate_kwargs,
    )
    df["label"] = df["mode"].map(LABELS)
    df.attrs["config"] = {**df.attrs.get("config", {}), "seed": seed,
                          "static_sets": "TopK(d) frequency on train_trace",
                          "n_train_tokens": train_trace.n_tokens}
    return df


def mass_kept_by_mode(
    test_trace, train_trace, densities: Sequence[float] = (0.1, 0.25, 0.5), seed: int = 0
) -> pd.DataFrame:
    """Share of each held-out token's ``|h|`` mass kept by each kind of mask, per layer.

        >>> df = mass_kept_by_mode(test_trace, train_trace, densities=(0.25, 0.5))
        >>> df.pivot_table(index="layer", columns="mode", values="mass_kept")

    Why fixed sets fail, without running the model: per layer and density, the mean over
    the tokens of ``test_trace`` of ``sum(|h| kept) / sum(|h|)`` for the token's own top
    ``d`` neurons (``"oracle"``), the static set chosen on ``train_trace`` and a random
    set, the same sets :func:`contextual_vs_static` runs. Tokens whose ``|h|`` is all zero
    are left out. Columns: ``layer, density, mode, label, mass_kept``.
    """
    import torch

    from sparselab.masking.rules import TopK
    from sparselab.prediction.static import static_from_trace

    for name, trace in (("test_trace", test_trace), ("train_trace", train_trace)):
        if "h" not in trace.arrays:
            raise KeyError(f"{name} has no 'h' array (recorded: {sorted(trace.arrays)})")
    missing = sorted(set(test_trace.layers) - set(train_trace.layers))
    if missing:
        raise ValueError(f"train_trace did not record layers {missing} of test_trace")
    rows = []
    for d in (float(x) for x in densities):
        static = static_from_trace(train_trace, TopK(keep=d), d, layers=test_trace.layers)
        rand = random_sets(test_trace.layers, test_trace.n_neurons, d, seed)
        k = len(rand[test_trace.layers[0]])
        for layer in test_trace.layers:
            mags = test_trace.activations(layer).abs().double()
            total = mags.sum(1)
            valid = total > 0
            kept = {
                "oracle": mags.topk(k, dim=1).values.sum(1),
                "static": mags[:, torch.from_numpy(static[layer])].sum(1),
                "random": mags[:, torch.from_numpy(rand[layer])].sum(1),
            }
            for mode, inside in kept.items():
                share = float((inside[valid] / total[valid]).mean()) if bool(valid.any()) else float("nan")
                rows.append({"layer": layer, "density": d, "mode": mode, "label": LABELS[mode], "mass_kept": share})
    df = pd.DataFrame(rows)
    df.attrs["config"] = {"densities": [float(x) for x in densities], "seed": seed,
                          "n_test_tokens": test_trace.n_tokens, "n_train_tokens": train_trace.n_tokens}
    df.attrs["model"] = test_trace.meta.get("model", {})
    return df
