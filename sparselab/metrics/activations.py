"""Metrics that need the recorded activations beside the masks: the share of |h| mass a
mask keeps, the distribution of magnitudes, and the per-layer summary.

    >>> sl.metrics.mass_kept(masks, trace)
    >>> sl.metrics.summary(masks, trace)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from sparselab._version import versions
from sparselab.masking.masks import Masks, as_masks
from sparselab.metrics._frames import attach_provenance, long_frame
from sparselab.metrics.tokens import churn, density


def _check_trace_matches(masks: Masks, trace) -> None:
    if trace.n_tokens != masks.n_tokens or trace.n_neurons != masks.n_neurons:
        raise ValueError(
            f"masks ({masks.n_tokens} tokens x {masks.n_neurons} neurons) do not belong to this "
            f"trace ({trace.n_tokens} tokens x {trace.n_neurons} neurons)"
        )
    if not np.array_equal(trace.seq_ids, masks.seq_ids) or not np.array_equal(
        trace.positions, masks.positions
    ):
        raise ValueError("masks and trace list different tokens (sequence ids / positions differ)")
    missing = [layer for layer in masks.layers if layer not in trace.layers]
    if missing:
        raise ValueError(f"masks have layers {missing} that the trace did not record")


def mass_kept(masks: Masks, trace) -> pd.DataFrame:
    """Share of the ``|h|`` mass of each token that its mask keeps.

        >>> sl.metrics.mass_kept(masks, trace).groupby("layer").mass_kept.mean()

    ``mass_kept = sum(|h| * mask) / sum(|h|)`` per layer and token (NaN where a token's
    ``|h|`` is all zero), always on ``h = act(gate) * up`` whatever the rule looked at -
    it is ``h`` that the down projection multiplies. Columns: ``layer, token, seq_id,
    position, mass_kept``.
    """
    masks = as_masks(masks)
    _check_trace_matches(masks, trace)
    kept = np.empty((masks.n_layers, masks.n_tokens))
    for li, layer in enumerate(masks.layers):
        mags = trace.activations(layer).abs()
        # sums accumulate in float64: a share near 1 must not round up past it
        total = mags.sum(dim=1, dtype=torch.float64).numpy()
        inside = (mags * torch.from_numpy(masks.layer(layer))).sum(dim=1, dtype=torch.float64).numpy()
        with np.errstate(invalid="ignore", divide="ignore"):
            kept[li] = np.where(total > 0, inside / total, np.nan)
    df = long_frame(masks, np.arange(masks.n_tokens), {"mass_kept": kept})
    return attach_provenance(df, masks)


def activation_magnitude(
    trace, source: str = "h", quantiles: Sequence[float] = (0.1, 0.5, 0.9)
) -> pd.DataFrame:
    """Distribution of ``|h|`` (or ``|act(gate)|``) per layer over all tokens and neurons.

        >>> sl.metrics.activation_magnitude(trace)[["layer", "median"]]

    Columns: ``layer, source, mean`` and one column per quantile, named ``q10, median,
    q90`` for the defaults (``q<100*q>`` in general, ``median`` for 0.5).
    """
    if source not in ("h", "gate"):
        raise ValueError(f"source must be 'h' or 'gate', got {source!r}")
    qs = [float(q) for q in quantiles]
    if any(not 0.0 <= q <= 1.0 for q in qs):
        raise ValueError(f"quantiles must lie in [0, 1], got {qs}")
    names = ["median" if q == 0.5 else f"q{100 * q:g}" for q in qs]
    rows = []
    for layer in trace.layers:
        mags = trace.values(source, layer).abs().numpy().reshape(-1)
        values = np.quantile(mags, qs) if qs else []
        rows.append({"layer": layer, "source": source, "mean": float(mags.mean()), **dict(zip(names, values, strict=True))})
    df = pd.DataFrame(rows)
    df.attrs["versions"] = versions()
    df.attrs["model"] = trace.meta.get("model", {})
    return df


def summary(masks: Masks, trace=None) -> pd.DataFrame:
    """Per-layer table: mean density, mean churn (and its random baseline), mass kept.

        >>> sl.metrics.summary(masks, trace)

    Columns: ``layer, density, churn, random_churn`` and, with a ``trace``,
    ``mass_kept``. ``churn < random_churn`` means consecutive tokens share more neurons
    than independent masks of the same density would.
    """
    masks = as_masks(masks)
    dens = density(masks).groupby("layer", sort=False).density.mean()
    ch = churn(masks).groupby("layer", sort=False)[["churn", "random_churn"]].mean()
    df = pd.DataFrame({"layer": list(masks.layers)})
    df["density"] = df.layer.map(dens)
    df["churn"] = df.layer.map(ch.churn)
    df["random_churn"] = df.layer.map(ch.random_churn)
    if trace is not None:
        df["mass_kept"] = df.layer.map(mass_kept(masks, trace).groupby("layer").mass_kept.mean())
    return attach_provenance(df, masks)
