"""What limits a neuron-selection score: its form, its inputs, or its training?

    >>> df = selection_scores.compare_scores(model, train_trace, test_trace, layers=(2, 10, 20))
    >>> df.pivot(index="layer", columns="score", values="mass_kept")

Every score ranks each token's neurons; the measure is the share of held-out ``|h|`` mass
that the top ``density`` of the score keeps (the oracle, ``|h|`` itself, is the ceiling).
Scores compared at the same rank:

- ``trained``: the library's low-rank predictor (:func:`sparselab.train_predictors`,
  mass loss, Adam);
- ``rrr``: closed-form reduced-rank ridge regression of ``sqrt|h|`` on ``x`` (no training
  loop: one solve and one SVD);
- ``rrr_prev``: the same on ``[x_t, x_{t-1}]`` (does the previous token add anything?);
- ``mlp``: a nonlinear predictor ``x -> width -> ReLU -> neurons`` trained with the same
  loss and optimizer as ``trained`` (width = rank, and a wide one);
- ``shadow``: ``|act(gate4 x) * (up4 x)|`` from 4-bit group-64 copies of gate and up.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import pandas as pd
import torch
import torch.nn.functional as F

from sparselab.masking.rules import Calibrated
from sparselab.masking.thresholds import top_count, top_k_mask
from sparselab.prediction.scoring import mass_share

__all__ = ["compare_scores", "fit_mlp_scores", "fit_rrr", "previous_token_inputs"]


def fit_rrr(x: torch.Tensor, y: torch.Tensor, rank: int, ridge: float = 1e-3):
    """Reduced-rank ridge regression ``y ~ second @ (first @ x) + bias``: the ridge solution
    projected on the top ``rank`` directions of its fitted values. Returns (first [r, H],
    second [N, r], bias [N]), float32.

        >>> first, second, bias = fit_rrr(x, h.abs().sqrt(), rank=64)
    """
    x64, y64 = x.double(), y.double()
    mx, my = x64.mean(0), y64.mean(0)
    xc, yc = x64 - mx, y64 - my
    gram = xc.T @ xc
    gram += ridge * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype)
    beta = torch.linalg.solve(gram, xc.T @ yc)  # [H, N]
    _, _, vh = torch.linalg.svd(xc @ beta, full_matrices=False)
    v = vh[:rank].T  # [N, r]
    first = (beta @ v).T  # [r, H]
    bias = my - v @ (first @ mx)
    return first.float(), v.float(), bias.float()


def previous_token_inputs(trace, layer: int) -> torch.Tensor:
    """``[x_t, x_{t-1}]`` per token (zeros before a sequence's first token)."""
    x = trace.mlp_inputs(layer).float()
    prev = torch.zeros_like(x)
    prev[1:] = x[:-1]
    seq = torch.as_tensor(trace.seq_ids)
    first = torch.ones(len(seq), dtype=torch.bool)
    first[1:] = seq[1:] != seq[:-1]
    prev[first] = 0.0
    return torch.cat([x, prev], dim=1)


def fit_mlp_scores(x: torch.Tensor, target: torch.Tensor, weights: torch.Tensor, width: int,
                   epochs: int = 8, lr: float = 3e-3, batch_size: int = 256, seed: int = 0):
    """Train ``x -> width -> ReLU -> neurons`` with the library's mass-weighted BCE and Adam
    (inputs standardised); returns a function from raw inputs to scores."""
    g = torch.Generator().manual_seed(seed)
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    xs = (x - mean) / std
    hidden, n = x.shape[1], target.shape[1]
    w1 = ((torch.rand(width, hidden, generator=g) * 2 - 1) / hidden ** 0.5).requires_grad_()
    b1 = torch.zeros(width, requires_grad=True)
    w2 = ((torch.rand(n, width, generator=g) * 2 - 1) / width ** 0.5).requires_grad_()
    rate = target.mean(0).clamp(1e-4, 1 - 1e-4)
    b2 = torch.log(rate / (1 - rate)).requires_grad_()
    params = [w1, b1, w2, b2]
    opt = torch.optim.Adam(params, lr=lr)
    for _ in range(epochs):
        order = torch.randperm(len(xs), generator=g)
        for start in range(0, len(xs), batch_size):
            idx = order[start:start + batch_size]
            scores = F.linear(F.relu(F.linear(xs[idx], w1, b1)), w2, b2)
            loss = F.binary_cross_entropy_with_logits(scores, target[idx], weight=weights[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    frozen = [p.detach() for p in params]

    def score(inputs: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            z = (inputs - mean) / std
            return F.linear(F.relu(F.linear(z, frozen[0], frozen[1])), frozen[2], frozen[3])

    return score


def compare_scores(model, train_trace, test_trace, layers: Sequence[int], rank: int = 64,
                   density: float = 0.5, epochs: int = 8, wide: int = 1024,
                   progress: bool = True) -> pd.DataFrame:
    """Held-out mass kept by each score's top ``density`` per layer (see module docstring).

    Columns: layer, score, rank, mass_kept, fit_seconds. Traces need ``h`` and ``mlp_in``.
    """
    from tqdm.auto import tqdm

    from sparselab.prediction import methods as M
    from sparselab.prediction.training import _targets_and_weights, train_predictors

    weights_by_layer = M._layer_weights(model)
    shadow = M.Shadow(density).fit(model)
    rows = []

    def add(layer, name, scores, h, seconds, r=rank):
        keep = top_k_mask(scores, top_count(density, h.shape[1]))
        rows.append({"layer": layer, "score": name, "rank": r, "mass_kept": mass_share(keep, h),
                     "fit_seconds": seconds})

    for layer in tqdm(list(layers), desc="scores", disable=not progress):
        x_tr, h_tr = train_trace.mlp_inputs(layer).float(), train_trace.activations(layer).float()
        x_te, h_te = test_trace.mlp_inputs(layer).float(), test_trace.activations(layer).float()
        add(layer, "oracle", h_te.abs(), h_te, 0.0, None)
        t0 = time.perf_counter()
        trained = train_predictors(train_trace, rank=rank, layers=[layer], epochs=epochs, progress=False)
        add(layer, "trained", trained.scores(layer, x_te), h_te, time.perf_counter() - t0)
        t0 = time.perf_counter()
        first, second, bias = fit_rrr(x_tr, h_tr.abs().sqrt(), rank)
        add(layer, "rrr", bias + (x_te @ first.T) @ second.T, h_te, time.perf_counter() - t0)
        t0 = time.perf_counter()
        p_tr, p_te = previous_token_inputs(train_trace, layer), previous_token_inputs(test_trace, layer)
        first, second, bias = fit_rrr(p_tr, h_tr.abs().sqrt(), rank)
        add(layer, "rrr_prev", bias + (p_te @ first.T) @ second.T, h_te, time.perf_counter() - t0)
        rule = Calibrated(density=density).fit(train_trace)
        labels = rule.mask(h_tr, layer)
        target, wts = _targets_and_weights("mass", rule, h_tr, labels, layer)
        for width in (rank, wide):
            t0 = time.perf_counter()
            score = fit_mlp_scores(x_tr, target, wts, width, epochs=epochs)
            add(layer, f"mlp_{width}", score(x_te), h_te, time.perf_counter() - t0, width)
        w = weights_by_layer[layer]
        with torch.no_grad():
            g, u = shadow._gate[layer], shadow._up[layer]
            add(layer, "shadow4", (w.act(x_te @ g.T) * (x_te @ u.T)).abs(), h_te, 0.0, None)
    return pd.DataFrame(rows, columns=["layer", "score", "rank", "mass_kept", "fit_seconds"])
