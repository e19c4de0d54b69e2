"""How good a predicted mask is against the truth, as plain numbers (all tokens pooled).

    >>> tp, n_pred, n_true = confusion(pred, labels); f1_score(tp, n_pred, n_true)
    >>> mass_share(pred, h), energy_share(pred, h), oracle_mass_share(pred, h)

The per-token, per-layer *frames* of mass kept are :func:`sparselab.metrics.mass_kept`;
these are the pooled shares a predictor's evaluation reports per layer.
"""

from __future__ import annotations

import torch

__all__ = ["confusion", "energy_share", "f1_score", "mass_share", "oracle_mass_share"]


def confusion(pred: torch.Tensor, labels: torch.Tensor) -> tuple[int, int, int]:
    """(true positives, predicted positives, actual positives)."""
    return int((pred & labels).sum()), int(pred.sum()), int(labels.sum())


def f1_score(tp: int, n_pred: int, n_true: int) -> float:
    return 2.0 * tp / (n_pred + n_true) if n_pred + n_true else 1.0


def mass_share(mask: torch.Tensor, h: torch.Tensor) -> float:
    """Share of the total ``|h|`` mass at the kept positions (1.0 when there is no mass)."""
    mags = h.abs().double()
    total = float(mags.sum())
    return float(mags[mask].sum()) / total if total > 0 else 1.0


def energy_share(mask: torch.Tensor, h: torch.Tensor) -> float:
    """Share of the total ``h**2`` at the kept positions (1.0 when all ``h`` are zero).

    Dropping neuron ``i`` adds ``h_i * down[:, i]`` to the MLP output error, so the
    squared output error grows with the dropped ``h**2``, not with the dropped ``|h|``.
    """
    energy = h.double() ** 2
    total = float(energy.sum())
    return float(energy[mask].sum()) / total if total > 0 else 1.0


def oracle_mass_share(mask: torch.Tensor, h: torch.Tensor) -> float:
    """Share of ``|h|`` mass the best mask with the same per-token counts as ``mask`` keeps."""
    mags = h.abs().double()
    total = float(mags.sum())
    if total <= 0:
        return 1.0
    counts = mask.sum(-1)
    cum = mags.sort(-1, descending=True).values.cumsum(-1)
    cum = torch.cat([torch.zeros(cum.shape[0], 1, dtype=cum.dtype), cum], dim=1)
    return float(cum.gather(1, counts.long().unsqueeze(1)).sum()) / total
