"""Sparsity metrics over masks: tidy pandas DataFrames, computed on the packed bits.

    >>> masks = trace.masks(sl.rules.Calibrated(density=0.5))
    >>> sl.metrics.churn(masks).groupby("layer")[["churn", "random_churn"]].mean()
    >>> sl.metrics.window_reuse(masks, windows=(1, 4, 16)).head()

Every function takes a :class:`sparselab.Masks` and returns a long ("tidy") DataFrame
with one row per layer and token / neuron / window / batch size, so it feeds
:mod:`sparselab.figures` and ``groupby`` directly. Each frame carries the rule that made
the masks and the library versions in ``df.attrs`` (``"rule"``, ``"versions"``).

Sequences: "consecutive" tokens are neighbours in (sequence id, position) order inside
one sequence; churn and window reuse never look across the start of a sequence.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from sparselab._version import versions
from sparselab.bits import popcount, unpack_bits
from sparselab.masks import Masks

__all__ = [
    "activation_magnitude",
    "batch_union",
    "churn",
    "density",
    "mass_kept",
    "neuron_frequency",
    "sample_batches",
    "sequence_order",
    "summary",
    "window_reuse",
]


# ----------------------------------------------------------------------------- helpers


def _check_masks(masks: Any) -> Masks:
    if not isinstance(masks, Masks):
        raise TypeError(f"expected sparselab.Masks (e.g. trace.masks(rule)), got {type(masks).__name__}")
    return masks


def _attrs(df: pd.DataFrame, masks: Masks, **config: Any) -> pd.DataFrame:
    """Attach provenance: which rule made the masks, the metric's settings, versions."""
    df.attrs["rule"] = dict(masks.rule)
    if config:
        df.attrs["config"] = config
    df.attrs["versions"] = versions()
    return df


def _positive_ints(name: str, values: Iterable[int]) -> tuple[int, ...]:
    out = tuple(sorted({int(v) for v in values}))
    if not out:
        raise ValueError(f"{name} must list at least one value")
    if out[0] < 1:
        raise ValueError(f"{name} must be positive integers, got {list(values)}")
    return out


def sequence_order(seq_ids: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Token order by (sequence, position) and each token's rank inside its sequence.

        >>> order, rank = sequence_order(np.array([0, 0, 1]), np.array([0, 1, 0]))
        >>> order.tolist(), rank.tolist()          # rank is given in sorted order
        ([0, 1, 2], [0, 1, 0])

    ``rank[i]`` is the number of tokens before ``order[i]`` in its sequence, so token
    ``order[i]`` has the previous ``k`` tokens of its own sequence iff ``rank[i] >= k``.
    """
    seq_ids = np.asarray(seq_ids)
    order = np.lexsort((np.asarray(positions), seq_ids))
    sorted_seq = seq_ids[order]
    n = len(order)
    starts = np.ones(n, dtype=bool)
    starts[1:] = sorted_seq[1:] != sorted_seq[:-1]
    start_index = np.maximum.accumulate(np.where(starts, np.arange(n), 0)) if n else starts
    rank = np.arange(n) - start_index
    return order, rank.astype(np.int64)


def _long_frame(masks: Masks, tokens: np.ndarray, columns: dict[str, np.ndarray]) -> pd.DataFrame:
    """Frame with one row per (layer, token): ``columns`` hold ``[layers, len(tokens)]``."""
    n_layers, n = masks.n_layers, len(tokens)
    data: dict[str, np.ndarray] = {
        "layer": np.repeat(np.asarray(masks.layers, dtype=np.int64), n),
        "token": np.tile(tokens, n_layers),
        "seq_id": np.tile(masks.seq_ids[tokens], n_layers),
        "position": np.tile(masks.positions[tokens], n_layers),
    }
    for name, values in columns.items():
        data[name] = np.asarray(values).reshape(-1)
    return pd.DataFrame(data)


# ----------------------------------------------------------------------------- per token


def density(masks: Masks) -> pd.DataFrame:
    """Active neurons per layer and token.

        >>> sl.metrics.density(masks).groupby("layer").density.mean()

    Columns: ``layer, token, seq_id, position, active`` (count), ``density`` (share).
    """
    masks = _check_masks(masks)
    counts = masks.counts()
    tokens = np.arange(masks.n_tokens)
    df = _long_frame(masks, tokens, {"active": counts, "density": counts / float(masks.n_neurons)})
    return _attrs(df, masks)


def churn(masks: Masks) -> pd.DataFrame:
    """Change of the mask from one token to the next inside each sequence (XOR of bits).

        >>> df = sl.metrics.churn(masks)
        >>> df.groupby("layer")[["churn", "random_churn"]].mean()

    One row per layer and token that has a predecessor in its sequence (the first token
    of every sequence has none and is left out). Columns:

    - ``added``: neurons active now but not at the previous token;
    - ``removed``: neurons active at the previous token but not now;
    - ``active``: neurons active now; ``density`` = ``active / n_neurons``;
    - ``churn`` = ``(added + removed) / n_neurons``: the Hamming distance of the two
      masks as a share of the neurons (what a weight cache must swap, in both directions);
    - ``random_churn``: the expected ``churn`` of two *independent* random masks with
      the same two sizes, ``d_prev (1 - d) + d (1 - d_prev)`` - the baseline that says
      whether consecutive tokens are more alike than chance.
    """
    masks = _check_masks(masks)
    order, rank = sequence_order(masks.seq_ids, masks.positions)
    has_prev = np.flatnonzero(rank > 0)
    now, prev = order[has_prev], order[has_prev - 1]
    cur_bits, prev_bits = masks.bits[:, now], masks.bits[:, prev]
    diff = cur_bits ^ prev_bits
    added = popcount(diff & cur_bits)
    removed = popcount(diff & prev_bits)
    active = popcount(cur_bits)
    n = float(masks.n_neurons)
    d_now, d_prev = active / n, popcount(prev_bits) / n
    df = _long_frame(
        masks,
        now,
        {
            "added": added,
            "removed": removed,
            "active": active,
            "density": d_now,
            "churn": (added + removed) / n,
            "random_churn": d_prev * (1.0 - d_now) + d_now * (1.0 - d_prev),
        },
    )
    return _attrs(df, masks)


# ----------------------------------------------------------------------------- windows


def window_reuse(masks: Masks, windows: Sequence[int] = (1, 2, 4, 8, 16, 32)) -> pd.DataFrame:
    """LLM-in-a-Flash sliding-window neuron cache: footprint and new loads vs window ``k``.

        >>> df = sl.metrics.window_reuse(masks, windows=(1, 2, 4, 8))
        >>> df[df.layer == 0][["window", "footprint", "new_fraction", "random_new_fraction"]]

    For token ``t`` and window ``k`` (both inside one sequence):

    - footprint: ``|m[t-k+1] | ... | m[t]| / n_neurons``, the share of neurons a cache
      holding the last ``k`` tokens' neurons keeps;
    - new: ``|m[t] & ~(m[t-k] | ... | m[t-1])|``, neurons token ``t`` needs that the
      previous ``k`` tokens did not load.

    Averaged over the tokens that have at least ``k`` predecessors in their sequence (the
    same tokens for both, so a full window and its baseline are compared; ``n_tokens``
    says how many; a window longer than every sequence gives NaN). Columns: ``layer,
    window, n_tokens, density`` (mean share active over those tokens), ``footprint,
    new_per_token`` (neurons), ``new_fraction`` (share of neurons), and the random-reuse
    baseline for independent masks of that density ``d``: ``random_footprint`` =
    ``1 - (1 - d)^k`` and ``random_new_fraction`` = ``d (1 - d)^k``.
    """
    masks = _check_masks(masks)
    windows = _positive_ints("windows", windows)
    order, rank = sequence_order(masks.seq_ids, masks.positions)
    bits = masks.bits[:, order]  # [L, T, W] in sequence order
    n = float(masks.n_neurons)
    active = popcount(bits)
    footprint: dict[int, np.ndarray] = {}
    new: dict[int, np.ndarray] = {}
    # prev_union[:, t] = m[t-1] | ... | m[t-j] after step j; tokens with rank < j get bits
    # from the previous sequence, but they are never used for a window k >= j
    prev_union = np.zeros_like(bits)
    for j in range(max(windows) + 1):
        if j:
            prev_union[:, j:] |= bits[:, :-j]
        if j + 1 in windows:
            use = rank >= j + 1
            footprint[j + 1] = popcount(prev_union[:, use] | bits[:, use]).mean(axis=1) if use.any() else None
        if j in windows:
            use = rank >= j
            new[j] = popcount(bits[:, use] & ~prev_union[:, use]).mean(axis=1) if use.any() else None
    rows = []
    nan = np.full(masks.n_layers, np.nan)
    for k in windows:
        use = rank >= k
        count = int(use.sum())
        d = active[:, use].mean(axis=1) / n if count else nan
        fp = footprint[k] / n if count else nan
        nw = new[k] if count else nan
        for li, layer in enumerate(masks.layers):
            rows.append(
                {
                    "layer": layer,
                    "window": k,
                    "n_tokens": count,
                    "density": d[li],
                    "footprint": fp[li],
                    "new_per_token": nw[li],
                    "new_fraction": nw[li] / n,
                    "random_footprint": 1.0 - (1.0 - d[li]) ** k,
                    "random_new_fraction": d[li] * (1.0 - d[li]) ** k,
                }
            )
    df = pd.DataFrame(rows).sort_values(["layer", "window"], ignore_index=True)
    return _attrs(df, masks, windows=list(windows))


# ----------------------------------------------------------------------------- neurons


def neuron_frequency(masks: Masks) -> pd.DataFrame:
    """Firing frequency of every neuron and the sorted CDF of activations it covers.

        >>> df = sl.metrics.neuron_frequency(masks)
        >>> df[(df.layer == 0) & (df.rank_fraction <= 0.2)].cum_share.max()  # top 20 %

    Columns: ``layer, neuron, frequency`` (share of tokens where it is active),
    ``rank`` (1 = most frequent; ties broken by neuron index), ``rank_fraction`` =
    ``rank / n_neurons``, ``cum_share``: share of all activations of the layer carried
    by the neurons of rank <= this one (NaN for a layer with no activation at all).
    """
    masks = _check_masks(masks)
    n = masks.n_neurons
    frames = []
    for li, layer in enumerate(masks.layers):
        counts = unpack_bits(masks.bits[li], n).sum(axis=0, dtype=np.int64)
        order = np.argsort(-counts, kind="stable")
        rank = np.empty(n, dtype=np.int64)
        rank[order] = np.arange(1, n + 1)
        total = counts.sum()
        cum = np.empty(n, dtype=np.float64)
        cum[order] = np.cumsum(counts[order]) / total if total else np.nan
        frames.append(
            pd.DataFrame(
                {
                    "layer": layer,
                    "neuron": np.arange(n),
                    "frequency": counts / max(masks.n_tokens, 1),
                    "rank": rank,
                    "rank_fraction": rank / n,
                    "cum_share": cum,
                }
            )
        )
    return _attrs(pd.concat(frames, ignore_index=True), masks)


# ----------------------------------------------------------------------------- batches


def sample_batches(n_tokens: int, size: int, n_batches: int, seed: int = 0) -> np.ndarray:
    """Token indices of ``n_batches`` random batches of ``size`` distinct tokens.

        >>> sample_batches(10, 3, 2, seed=0).shape
        (2, 3)

    Deterministic per ``(seed, size)``, so adding a size to a sweep does not change the
    batches drawn for the others.
    """
    if not 1 <= size <= n_tokens:
        raise ValueError(f"batch size {size} must be between 1 and the number of tokens ({n_tokens})")
    if n_batches < 1:
        raise ValueError(f"n_batches must be >= 1, got {n_batches}")
    rng = np.random.default_rng([int(seed), int(size)])
    return np.stack([rng.choice(n_tokens, size=size, replace=False) for _ in range(n_batches)])


def batch_union(
    masks: Masks,
    sizes: Sequence[int] = (1, 2, 4, 8, 16, 32),
    n_batches: int = 200,
    seed: int = 0,
) -> pd.DataFrame:
    """Density of the union of the masks of ``B`` random tokens, vs the independence model.

        >>> df = sl.metrics.batch_union(masks, sizes=(1, 4, 16))
        >>> df[["layer", "size", "union_density", "independent"]]

    A batched sparse MLP must load every neuron any token of the batch needs. Batches
    are drawn from all tokens (see :func:`sample_batches`; the same batches for every
    layer). Columns: ``layer, size, n_batches, density`` (``p``, the layer's mean
    density), ``union_density`` and ``union_std`` over the batches, ``independent`` =
    ``1 - (1 - p)^B`` (what masks drawn independently would give).
    """
    masks = _check_masks(masks)
    sizes = _positive_ints("sizes", sizes)
    if sizes[-1] > masks.n_tokens:
        raise ValueError(f"batch size {sizes[-1]} exceeds the {masks.n_tokens} tokens of these masks")
    n = float(masks.n_neurons)
    p = masks.counts().mean(axis=1) / n
    rows = []
    for size in sizes:
        idx = sample_batches(masks.n_tokens, size, n_batches, seed)
        for li, layer in enumerate(masks.layers):
            union = np.bitwise_or.reduce(masks.bits[li][idx], axis=1)  # [n_batches, W]
            dens = popcount(union) / n
            rows.append(
                {
                    "layer": layer,
                    "size": size,
                    "n_batches": n_batches,
                    "density": p[li],
                    "union_density": dens.mean(),
                    "union_std": dens.std(ddof=1) if n_batches > 1 else 0.0,
                    "independent": 1.0 - (1.0 - p[li]) ** size,
                }
            )
    df = pd.DataFrame(rows).sort_values(["layer", "size"], ignore_index=True)
    return _attrs(df, masks, sizes=list(sizes), n_batches=n_batches, seed=seed)


# ----------------------------------------------------------------------------- with trace


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
    masks = _check_masks(masks)
    _check_trace_matches(masks, trace)
    kept = np.empty((masks.n_layers, masks.n_tokens))
    for li, layer in enumerate(masks.layers):
        mags = trace.activations(layer).abs()
        # sums accumulate in float64: a share near 1 must not round up past it
        total = mags.sum(dim=1, dtype=torch.float64).numpy()
        inside = (mags * torch.from_numpy(masks.layer(layer))).sum(dim=1, dtype=torch.float64).numpy()
        with np.errstate(invalid="ignore", divide="ignore"):
            kept[li] = np.where(total > 0, inside / total, np.nan)
    df = _long_frame(masks, np.arange(masks.n_tokens), {"mass_kept": kept})
    return _attrs(df, masks)


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
        mags = trace._get(source, layer).abs().numpy().reshape(-1)
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
    masks = _check_masks(masks)
    dens = density(masks).groupby("layer", sort=False).density.mean()
    ch = churn(masks).groupby("layer", sort=False)[["churn", "random_churn"]].mean()
    df = pd.DataFrame({"layer": list(masks.layers)})
    df["density"] = df.layer.map(dens)
    df["churn"] = df.layer.map(ch.churn)
    df["random_churn"] = df.layer.map(ch.random_churn)
    if trace is not None:
        df["mass_kept"] = df.layer.map(mass_kept(masks, trace).groupby("layer").mass_kept.mean())
    return _attrs(df, masks)
