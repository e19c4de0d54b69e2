"""Training low-rank predictors on a recording: labels from a rule, one fit per layer.

    >>> predictors = sl.train_predictors(train, rank=64)               # density 0.5
    >>> predictors = sl.train_predictors(train, rank_search=[32, 64, 128], target_recall=0.9)

Labels come from a rule of :mod:`sparselab.masking.rules` applied to the recorded
activations (default ``Calibrated(density=0.5)`` on ``|act(gate) * up|``: magnitude, not
the sign of the gate), and inputs are what the predictor will see when the model runs:
the MLP's post-norm input, or with ``lookahead=True`` the layer's input-norm output
(before attention, so the prediction can run alongside attention).

Training losses (``loss=``): ``"bce"`` - binary cross-entropy with ``pos_weight`` =
negatives / positives; ``"mass"`` - the same, each (token, neuron) weighted by how far its
magnitude is from the rule's boundary (a miss near the boundary costs little activation
mass, a miss far from it costs much); ``"logmag"`` - regression of ``log(|h| / boundary)``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from sparselab.masking.rules import Calibrated, Rule, Threshold
from sparselab.masking.thresholds import quantile_grid, threshold_from_quantiles, top_k_mask
from sparselab.prediction.lowrank import Predictors
from sparselab.prediction.policy import Policy
from sparselab.prediction.scoring import confusion, f1_score, mass_share

__all__ = ["LOSSES", "LowRankFit", "fit_low_rank", "resolve_rank", "split_sequences", "train_predictors"]

LOSSES = ("bce", "mass", "logmag")


def split_sequences(trace, held_out: float = 0.25, seed: int = 0):
    """Split a trace by sequence (never inside a text): ``(train, held_out)`` traces.

        >>> train, test = split_sequences(trace, held_out=0.25)
    """
    if not 0.0 < held_out < 1.0:
        raise ValueError(f"held_out must be in (0, 1), got {held_out}")
    seqs = np.unique(trace.seq_ids)
    if len(seqs) < 2:
        raise ValueError(f"cannot split a trace of {len(seqs)} sequence(s) by sequence")
    g = torch.Generator().manual_seed(int(seed))
    order = seqs[torch.randperm(len(seqs), generator=g).numpy()]
    n_test = min(len(seqs) - 1, max(1, int(round(held_out * len(seqs)))))
    test = np.sort(order[:n_test])
    return trace.select_sequences(np.setdiff1d(seqs, test)), trace.select_sequences(test)


def resolve_rank(rank: int | float, n_neurons: int, hidden: int) -> int:
    """An int rank, or a float fraction of the intermediate size, as a neuron count."""
    if isinstance(rank, bool) or not isinstance(rank, (int, float, np.integer, np.floating)):
        raise TypeError(f"rank must be an int or a float fraction, got {rank!r}")
    if isinstance(rank, (float, np.floating)):
        if not 0.0 < rank <= 1.0:
            raise ValueError(f"a float rank is a fraction of the intermediate size in (0, 1], got {rank}")
        rank = max(1, int(round(rank * n_neurons)))
    rank = int(rank)
    if not 1 <= rank <= min(hidden, n_neurons):
        raise ValueError(
            f"rank {rank} must be in [1, min(hidden={hidden}, intermediate={n_neurons})]"
        )
    return rank


def _boundary(rule: Rule, magnitudes: torch.Tensor, labels: torch.Tensor, layer: int) -> torch.Tensor:
    """The magnitude separating kept from dropped neurons: per layer if the rule has one,
    else per token, midway between the smallest kept and the largest dropped magnitude."""
    thresholds = getattr(rule, "thresholds", None)
    if thresholds:
        return torch.tensor(float(thresholds[layer]))
    if isinstance(rule, Threshold):
        return torch.tensor(float(rule.tau))
    inf = torch.tensor(float("inf"))
    lo = torch.where(labels, magnitudes, inf).min(-1, keepdim=True).values
    hi = torch.where(labels, -inf, magnitudes).max(-1, keepdim=True).values
    mid = (lo + hi) / 2
    return torch.where(lo.isinf(), hi, torch.where(hi.isinf(), lo, mid))


def _targets_and_weights(loss: str, rule: Rule, values: torch.Tensor, labels: torch.Tensor, layer: int):
    """Per (token, neuron) training target and weight for ``loss`` (weights: mean 1)."""
    magnitudes = values.abs()
    n_pos = int(labels.sum())
    n_neg = labels.numel() - n_pos
    if loss == "logmag":
        boundary = _boundary(rule, magnitudes, labels, layer).clamp_min(1e-12)
        # eps keeps log finite for exact zeros; 1 % of the boundary is far below it
        eps = 0.01 * boundary
        return torch.log(magnitudes + eps) - torch.log(boundary + eps), None
    target = labels.float()
    if loss == "bce":
        return target, None  # imbalance handled by pos_weight in the loss
    weights = (magnitudes - _boundary(rule, magnitudes, labels, layer)).abs()
    # equal total weight for each class (the class-imbalance correction of this loss)
    pos_total = weights[labels].sum().clamp_min(1e-12) if n_pos else 1.0
    neg_total = weights[~labels].sum().clamp_min(1e-12) if n_neg else 1.0
    half = 0.5 * labels.numel()
    weights = torch.where(labels, weights * (half / pos_total), weights * (half / neg_total))
    return target, weights


@dataclass
class LowRankFit:
    """Weights of one trained predictor (already folded to apply to raw inputs)."""

    first: torch.Tensor  # [rank, hidden]
    second: torch.Tensor  # [neurons, rank]
    bias: torch.Tensor  # [neurons]
    final_loss: float


def fit_low_rank(
    x: torch.Tensor,
    target: torch.Tensor,
    weights: torch.Tensor | None,
    rank: int,
    loss: str,
    epochs: int,
    lr: float,
    batch_size: int | None,
    generator: torch.Generator,
    pos_weight: float = 1.0,
) -> LowRankFit:
    """Train ``scores = second @ (first @ x) + bias`` with Adam; returns folded weights.

    Inputs are standardised per feature while training (Adam then sees well-scaled
    directions); the standardisation is folded back into ``first`` and ``bias`` so the
    result applies to raw inputs.
    """
    n_tokens, hidden = x.shape
    n_neurons = target.shape[1]
    mean = x.mean(0)
    std = x.std(0).clamp_min(1e-6) if n_tokens > 1 else torch.ones(hidden)
    xs = (x - mean) / std
    first = ((torch.rand(rank, hidden, generator=generator) * 2 - 1) / math.sqrt(hidden))
    second = ((torch.rand(n_neurons, rank, generator=generator) * 2 - 1) / math.sqrt(rank))
    if loss == "logmag":
        bias = target.mean(0)
    else:  # start at each neuron's log-odds: the network then only learns the context
        rate = target.mean(0).clamp(1e-4, 1 - 1e-4)
        bias = torch.log(rate / (1 - rate))
    params = [first.requires_grad_(), second.requires_grad_(), bias.clone().requires_grad_()]
    opt = torch.optim.Adam(params, lr=lr)
    batch = n_tokens if not batch_size else min(int(batch_size), n_tokens)
    pw = torch.tensor(float(pos_weight))
    last = float("nan")
    for _ in range(epochs):
        order = torch.randperm(n_tokens, generator=generator)
        total, count = 0.0, 0
        for start in range(0, n_tokens, batch):
            idx = order[start : start + batch]
            scores = torch.addmm(params[2], xs[idx] @ params[0].T, params[1].T)
            if loss == "logmag":
                value = F.mse_loss(scores, target[idx])
            elif weights is None:
                value = F.binary_cross_entropy_with_logits(scores, target[idx], pos_weight=pw)
            else:
                value = F.binary_cross_entropy_with_logits(scores, target[idx], weight=weights[idx])
            opt.zero_grad(set_to_none=True)
            value.backward()
            opt.step()
            total += float(value.detach()) * len(idx)
            count += len(idx)
        last = total / max(count, 1)
    with torch.no_grad():
        first_raw = params[0] / std
        bias_raw = params[2] - params[1] @ (first_raw @ mean)
    return LowRankFit(first_raw.detach().contiguous(), params[1].detach().contiguous(), bias_raw.detach(), last)


def train_predictors(
    trace,
    rule: Rule | None = None,
    rank: int | float = 64,
    lookahead: bool = False,
    layers: Sequence[int] | None = None,
    epochs: int = 8,
    lr: float = 3e-3,
    batch_size: int | None = 256,
    seed: int = 0,
    rank_search: Sequence[int | float] | None = None,
    progress: bool = True,
    *,
    loss: str = "mass",
    target_recall: float | None = None,
    target_density: float | None = None,
    top_k: int | float | None = None,
    validation: float = 0.25,
    rank_tolerance: float = 0.0,
) -> Predictors:
    """Train one low-rank predictor per layer on a trace (pass training sequences only).

        >>> predictors = sl.train_predictors(train, rank=64)               # density 0.5
        >>> predictors = sl.train_predictors(train, rank_search=[32, 64, 128], target_recall=0.9)

    - ``rule``: labels (default ``Calibrated(density=0.5)`` on ``|h|``; fitted on ``trace``
      if not fitted).
    - ``rank``: int, or float fraction of the intermediate size.
    - ``lookahead``: read the layer's input-norm output instead of the MLP input.
    - ``rank_search``: train every listed rank per layer on ``1 - validation`` of the
      training sequences and keep, per layer, the rank with the best F1 on the rest (the
      smallest within ``rank_tolerance`` of the best); ``rank`` is then ignored. F1
      grows with rank on real models, so a tolerance (e.g. 0.01) is what makes it pick.
    - ``loss``: "mass" (default), "bce" or "logmag" (module docstring).
    - policy (at most one): ``target_density`` (default 0.5), ``target_recall``, ``top_k``.
    - ``batch_size=None``: full-batch Adam.

    Deterministic for a given ``seed`` (torch.Generator), up to thread-count effects on
    float summation order.
    """
    from tqdm.auto import tqdm

    from sparselab._version import versions

    # -- validate everything before doing any work ----------------------------------------
    rule = Calibrated(density=0.5) if rule is None else rule
    if not isinstance(rule, Rule):
        raise TypeError(f"rule must be a sparselab.rules rule, got {type(rule).__name__}")
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; expected one of {LOSSES}")
    policy = Policy.from_kwargs(target_recall, target_density, top_k, default=Policy("density", 0.5))
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be an int >= 1, got {epochs!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be an int >= 1 or None (full batch), got {batch_size!r}")
    if not 0.0 < validation < 1.0:
        raise ValueError(f"validation must be in (0, 1), got {validation}")
    input_name = "layer_in" if lookahead else "mlp_in"
    for name in (input_name, rule.source):
        if name not in trace.arrays:
            raise KeyError(
                f"trace has no {name!r} array (recorded: {sorted(trace.arrays)}); record with "
                f"store=(..., {name!r})"
            )
    if trace.n_tokens == 0:
        raise ValueError("trace holds no tokens")
    layers = trace.layers if layers is None else tuple(int(x) for x in layers)
    for layer in layers:
        trace.layer_index(layer)  # KeyError naming the recorded layers
    if not layers:
        raise ValueError("no layers to train")
    n_neurons, hidden = trace.n_neurons, trace.hidden_size
    ranks = sorted({resolve_rank(r, n_neurons, hidden) for r in (rank_search or [rank])})
    if rank_search is not None and trace.n_sequences < 2:
        raise ValueError("rank_search needs a trace of at least 2 sequences (split by sequence)")

    # -- fit -----------------------------------------------------------------------------
    wall0, cpu0 = time.perf_counter(), time.process_time()
    rule = rule if rule.fitted else rule.fit(trace)
    g = torch.Generator().manual_seed(int(seed))
    if rank_search is not None:
        fit_trace, val_trace = split_sequences(trace, held_out=validation, seed=seed)
    else:
        fit_trace, val_trace = trace, None
    weights, calibration, info = {}, {}, {}
    bar = tqdm(layers, desc="training predictors", disable=not progress, unit="layer")
    for layer in bar:
        t_layer = time.perf_counter()
        x = _inputs(fit_trace, lookahead, layer)
        values = fit_trace.values(rule.source, layer)
        labels = rule.mask(values, layer)
        target, w = _targets_and_weights(loss, rule, values, labels, layer)
        n_pos = int(labels.sum())
        pos_weight = (labels.numel() - n_pos) / n_pos if n_pos else 1.0
        candidates = []
        for r in ranks:
            bar.set_postfix(layer=layer, rank=r)
            fit = fit_low_rank(x, target, w, r, loss, epochs, lr, batch_size, g, pos_weight)
            entry = {"rank": r, "final_loss": fit.final_loss}
            if val_trace is not None:
                entry.update(_validation_scores(fit, fit_trace, val_trace, rule, policy, lookahead, layer, g))
            candidates.append((entry, fit))
        entry, fit = _pick(candidates, rank_tolerance) if val_trace is not None else candidates[0]
        weights[layer] = (fit.first, fit.second, fit.bias)
        scores, all_labels = _scores_labels(fit, trace, rule, lookahead, layer)
        calibration[layer] = (quantile_grid(scores, generator=g), quantile_grid(scores[all_labels], generator=g))
        info[layer] = {
            **entry,
            "label_density": float(all_labels.float().mean()),
            "pos_weight": pos_weight,
            "seconds": time.perf_counter() - t_layer,
        }
        if len(candidates) > 1:
            info[layer]["search"] = [c for c, _ in candidates]
    config = {
        "rank": rank if rank_search is None else None,
        "rank_search": None if rank_search is None else list(rank_search),
        "rank_tolerance": rank_tolerance,
        "loss": loss,
        "epochs": epochs,
        "lr": lr,
        "batch_size": batch_size,
        "seed": seed,
        "validation": validation if rank_search is not None else None,
        "n_tokens": trace.n_tokens,
        "n_sequences": trace.n_sequences,
        "n_fit_tokens": fit_trace.n_tokens,
        "torch_threads": torch.get_num_threads(),
        "seconds": time.perf_counter() - wall0,
        "cpu_seconds": time.process_time() - cpu0,
        "trained_at": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()),
    }
    model = dict(trace.meta.get("model") or {})
    if trace.meta.get("mlp_fingerprint"):  # checked by Predictors.load(..., model=)
        model["mlp_fingerprint"] = trace.meta["mlp_fingerprint"]
    return Predictors(
        weights,
        rule,
        policy=policy,
        lookahead=lookahead,
        calibration=calibration,
        model=model,
        activation=trace.meta.get("activation"),
        config=config,
        layer_info=info,
        versions=versions(),
    )


def _inputs(trace, lookahead: bool, layer: int) -> torch.Tensor:
    return trace.layer_inputs(layer) if lookahead else trace.mlp_inputs(layer)


def _scores_labels(fit: LowRankFit, trace, rule: Rule, lookahead: bool, layer: int):
    with torch.no_grad():
        scores = torch.addmm(fit.bias, _inputs(trace, lookahead, layer) @ fit.first.T, fit.second.T)
    return scores, rule.mask(trace.values(rule.source, layer), layer)


def _validation_scores(fit, fit_trace, val_trace, rule, policy, lookahead, layer, g) -> dict:
    """F1 and mass kept on the validation sequences, thresholds chosen on the fit ones."""
    scores, labels = _scores_labels(fit, fit_trace, rule, lookahead, layer)
    val_scores, val_labels = _scores_labels(fit, val_trace, rule, lookahead, layer)
    if policy.kind == "top_k":
        pred = top_k_mask(val_scores, policy.count(val_scores.shape[-1]))
    else:
        grid = quantile_grid(scores if policy.kind == "density" else scores[labels], generator=g)
        pred = val_scores > threshold_from_quantiles(grid, float(policy.value))
    tp, n_pred, n_true = confusion(pred, val_labels)
    return {
        "val_f1": f1_score(tp, n_pred, n_true),
        "val_recall": tp / n_true if n_true else float("nan"),
        "val_mass_kept": mass_share(pred, val_trace.activations(layer)) if "h" in val_trace.arrays else None,
    }


def _pick(candidates, tolerance: float):
    """Best validation F1; the smallest rank within ``tolerance`` of it (ranks ascending)."""
    best = max(entry["val_f1"] for entry, _ in candidates)
    for entry, fit in candidates:
        if entry["val_f1"] >= best - tolerance:
            return entry, fit
    return candidates[-1]
