"""Low-rank predictors that guess, from the hidden state, which MLP neurons matter.

    >>> train, test = sl.predictors.split_sequences(trace, held_out=0.25)
    >>> predictors = sl.train_predictors(train, rank=64)       # one predictor per layer
    >>> predictors.evaluate(test)[["layer", "recall", "mass_kept"]]
    >>> predictors.mask(3, x)                                  # bool [tokens, neurons]
    >>> predictors.with_policy(target_density=0.3).save("smollm2.predictors")

Each layer's predictor is ``hidden -> rank -> intermediate``: two linear maps without a
nonlinearity (bias on the second), whose outputs are the logits of "this neuron is
active". Labels come from a rule of :mod:`sparselab.rules` applied to the recorded
activations (default ``Calibrated(density=0.5)`` on ``|act(gate) * up|``: magnitude, not
the sign of the gate), and inputs are what the predictor will see when the model runs:
the MLP's post-norm input, or with ``lookahead=True`` the layer's input-norm output
(before attention, so the prediction can run alongside attention).

Scores become masks through a *policy* kept with the predictors: a per-layer threshold
reaching a target density or a target recall on the training tokens, or the top-k scores
of every token. Per-layer score quantiles from training are stored, so
:meth:`Predictors.with_policy` re-thresholds without the trace; :meth:`Predictors.calibrate`
recomputes them from another trace.

Training losses (``loss=``): ``"bce"`` - binary cross-entropy with ``pos_weight`` =
negatives / positives; ``"mass"`` - the same, each (token, neuron) weighted by how far its
magnitude is from the rule's boundary (a miss near the boundary costs little activation
mass, a miss far from it costs much); ``"logmag"`` - regression of ``log(|h| / boundary)``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from sparselab.rules import Calibrated, Rule, Threshold, rule_from_dict

FORMAT = "sparselab.predictors"
FORMAT_VERSION = 1
CONFIG_FILE = "predictors.json"
WEIGHTS_FILE = "predictors.safetensors"
LOSSES = ("bce", "mass", "logmag")
QUANTILES = 2049  # score quantiles kept per layer: density/recall resolution ~ 1/2048
_QUANTILE_SAMPLE = 1 << 20  # pairs beyond this are subsampled for quantiles (error ~5e-4)
IDENTITY_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers")


class PredictorFileError(ValueError):
    """A predictors directory that is missing, truncated, corrupted or not ours."""


class PredictorModelMismatch(ValueError):
    """Predictors loaded or used with a model they were not trained for."""


# --------------------------------------------------------------------------------------
# selection policy
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Policy:
    """How scores become a mask: ``kind`` in {"density", "recall", "top_k"} and its value.

        >>> Policy.from_kwargs(target_density=0.3)
        Policy(kind='density', value=0.3)

    ``density``/``recall`` choose one threshold per layer on the calibration tokens;
    ``top_k`` keeps the ``value`` best scores of every token (an int count, or a float
    fraction of the neurons).
    """

    kind: str
    value: float

    def __post_init__(self) -> None:
        if self.kind not in ("density", "recall", "top_k"):
            raise ValueError(f"unknown policy {self.kind!r}; expected density, recall or top_k")
        if self.kind == "top_k":
            if isinstance(self.value, bool) or not (
                (isinstance(self.value, (int, np.integer)) and self.value >= 0)
                or (isinstance(self.value, float) and 0.0 <= self.value <= 1.0)
            ):
                raise ValueError(
                    f"top_k must be an int count >= 0 or a float fraction in [0, 1], got {self.value!r}"
                )
        elif not 0.0 <= float(self.value) <= 1.0:
            raise ValueError(f"target_{self.kind} must be in [0, 1], got {self.value}")

    @classmethod
    def from_kwargs(
        cls,
        target_recall: float | None = None,
        target_density: float | None = None,
        top_k: int | float | None = None,
        default: Policy | None = None,
    ) -> Policy | None:
        given = {
            k: v
            for k, v in (("recall", target_recall), ("density", target_density), ("top_k", top_k))
            if v is not None
        }
        if len(given) > 1:
            raise ValueError(
                f"give at most one of target_recall, target_density, top_k (got {sorted(given)})"
            )
        if not given:
            return default
        kind, value = next(iter(given.items()))
        return cls(kind, value if kind == "top_k" else float(value))

    @property
    def needs_threshold(self) -> bool:
        return self.kind != "top_k"

    def count(self, n_neurons: int) -> int:
        """Neurons kept per token by a ``top_k`` policy."""
        if isinstance(self.value, float):
            return int(round(self.value * n_neurons))
        return min(int(self.value), n_neurons)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "value": self.value}

    @property
    def label(self) -> str:
        name = "top_k" if self.kind == "top_k" else f"target_{self.kind}"
        return f"{name}={self.value:g}"


# --------------------------------------------------------------------------------------
# small pure helpers
# --------------------------------------------------------------------------------------


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


def quantile_grid(values: torch.Tensor, n: int = QUANTILES, generator=None) -> torch.Tensor:
    """``n`` order statistics of ``values`` at probabilities ``0, 1/(n-1), ..., 1``.

    Large inputs are subsampled (uniformly, seeded) to bound the sort's memory.
    """
    flat = values.reshape(-1).float()
    if flat.numel() == 0:
        return torch.full((n,), float("nan"))
    if flat.numel() > _QUANTILE_SAMPLE:
        flat = flat[torch.randint(flat.numel(), (_QUANTILE_SAMPLE,), generator=generator)]
    ordered = flat.sort().values
    pos = torch.linspace(0, ordered.numel() - 1, n).round().long()
    return ordered[pos].clone()


def threshold_from_quantiles(grid: torch.Tensor, keep: float) -> float:
    """Threshold ``t`` with a share ``keep`` of the distribution described by ``grid`` above it."""
    if keep >= 1.0:
        return float("-inf")
    if keep <= 0.0:
        return float(grid[-1])
    probs = np.linspace(0.0, 1.0, len(grid))
    return float(np.interp(1.0 - keep, probs, grid.double().numpy()))


def top_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the ``k`` highest scores along the last axis."""
    out = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if k > 0:
        out.scatter_(-1, scores.topk(min(k, scores.shape[-1]), dim=-1).indices, True)
    return out


def _source_values(trace, source: str, layer: int) -> torch.Tensor:
    return trace.gate_activations(layer) if source == "gate" else trace.activations(layer)


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


def _confusion(pred: torch.Tensor, labels: torch.Tensor) -> tuple[int, int, int]:
    """(true positives, predicted positives, actual positives)."""
    return int((pred & labels).sum()), int(pred.sum()), int(labels.sum())


def _f1(tp: int, n_pred: int, n_true: int) -> float:
    return 2.0 * tp / (n_pred + n_true) if n_pred + n_true else 1.0


def mass_kept(mask: torch.Tensor, h: torch.Tensor) -> float:
    """Share of the total ``|h|`` mass at the kept positions (1.0 when there is no mass)."""
    mags = h.abs().double()
    total = float(mags.sum())
    return float(mags[mask].sum()) / total if total > 0 else 1.0


def energy_kept(mask: torch.Tensor, h: torch.Tensor) -> float:
    """Share of the total ``h**2`` at the kept positions (1.0 when all ``h`` are zero).

    Dropping neuron ``i`` adds ``h_i * down[:, i]`` to the MLP output error, so the
    squared output error grows with the dropped ``h**2``, not with the dropped ``|h|``.
    """
    energy = h.double() ** 2
    total = float(energy.sum())
    return float(energy[mask].sum()) / total if total > 0 else 1.0


def oracle_mass_kept(mask: torch.Tensor, h: torch.Tensor) -> float:
    """Share of ``|h|`` mass the best mask with the same per-token counts as ``mask`` keeps."""
    mags = h.abs().double()
    total = float(mags.sum())
    if total <= 0:
        return 1.0
    counts = mask.sum(-1)
    cum = mags.sort(-1, descending=True).values.cumsum(-1)
    cum = torch.cat([torch.zeros(cum.shape[0], 1, dtype=cum.dtype), cum], dim=1)
    return float(cum.gather(1, counts.long().unsqueeze(1)).sum()) / total


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------
# the predictors
# --------------------------------------------------------------------------------------


class Predictors:
    """Trained low-rank predictors of one model, one per layer (see module docstring).

        >>> predictors = sl.train_predictors(trace, rank=128)
        >>> predictors.scores(3, x).shape, predictors.mask(3, x).dtype   # [T, N], bool
        >>> predictors.union_mask(3, x)                                  # bool [N]

    Build them with :func:`train_predictors` or :meth:`load`. Objects are not changed in
    place: :meth:`with_policy` and :meth:`calibrate` return copies (sharing weights).
    """

    def __init__(
        self,
        weights: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
        rule: Rule,
        *,
        policy: Policy | None = None,
        lookahead: bool = False,
        calibration: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None,
        model: dict[str, Any] | None = None,
        activation: str | None = None,
        config: dict[str, Any] | None = None,
        layer_info: dict[int, dict[str, Any]] | None = None,
        versions: dict[str, str] | None = None,
    ) -> None:
        if not weights:
            raise ValueError("no layers: predictors need at least one layer's weights")
        if not isinstance(rule, Rule):
            raise TypeError(f"rule must be a sparselab.rules rule, got {type(rule).__name__}")
        policy = policy or Policy("density", 0.5)
        shapes = set()
        for layer, (first, second, bias) in weights.items():
            if first.ndim != 2 or second.ndim != 2 or bias.ndim != 1 or second.shape[1] != first.shape[0] \
                    or bias.shape[0] != second.shape[0]:
                raise ValueError(
                    f"layer {layer}: inconsistent shapes first {tuple(first.shape)}, second "
                    f"{tuple(second.shape)}, bias {tuple(bias.shape)} (expected [r, H], [N, r], [N])"
                )
            shapes.add((first.shape[1], second.shape[0]))
        if len(shapes) != 1:
            raise ValueError(f"layers disagree on (hidden, intermediate) sizes: {sorted(shapes)}")
        calibration = dict(calibration or {})
        if policy.needs_threshold:
            missing = sorted(set(weights) - set(calibration))
            if missing:
                raise ValueError(
                    f"policy {policy.label} needs calibration statistics for layers {missing}: "
                    "use predictors.calibrate(trace, ...)"
                )
        self._weights = {int(k): v for k, v in sorted(weights.items())}
        self.rule = rule
        self.policy = policy
        self.lookahead = bool(lookahead)
        self._calibration = {int(k): v for k, v in calibration.items()}
        self.model = dict(model or {})
        self.activation = activation
        self.config = dict(config or {})
        self.layer_info = {int(k): dict(v) for k, v in (layer_info or {}).items()}
        self.versions = dict(versions or {})
        (self.hidden_size, self.n_neurons), = shapes
        self.thresholds: dict[int, float | None] = {
            layer: self._threshold(layer, policy) for layer in self._weights
        }

    # -- shape and size -----------------------------------------------------------------
    @property
    def layers(self) -> tuple[int, ...]:
        """Model layer numbers that have a predictor."""
        return tuple(self._weights)

    def rank(self, layer: int) -> int:
        """Rank (inner width) of one layer's predictor."""
        return int(self._layer(layer)[0].shape[0])

    @property
    def ranks(self) -> dict[int, int]:
        return {layer: self.rank(layer) for layer in self.layers}

    @property
    def n_params(self) -> int:
        """Number of weights (both matrices and the bias) over all layers."""
        return sum(t.numel() for w in self._weights.values() for t in w)

    @property
    def bytes(self) -> int:
        """Bytes of the predictors' own weights (read on every forward; calibration excluded)."""
        return sum(t.numel() * t.element_size() for w in self._weights.values() for t in w)

    @property
    def dtype(self) -> torch.dtype:
        """Dtype the weights are stored in (inputs are cast to it)."""
        return next(iter(self._weights.values()))[0].dtype

    def to(self, dtype: torch.dtype) -> Predictors:
        """A copy with the weights cast to ``dtype`` (e.g. ``torch.bfloat16``: half the
        bytes; thresholds stay those calibrated in float32, so densities may drift)."""
        out = copy.copy(self)
        out._weights = {k: tuple(t.to(dtype) for t in w) for k, w in self._weights.items()}
        return out

    @property
    def input_name(self) -> str:
        """Which recorded array feeds the predictors: ``"layer_in"`` or ``"mlp_in"``."""
        return "layer_in" if self.lookahead else "mlp_in"

    def inputs(self, trace, layer: int) -> torch.Tensor:
        """The predictor inputs of ``layer`` in a trace (``[tokens, hidden]``)."""
        return trace.layer_inputs(layer) if self.lookahead else trace.mlp_inputs(layer)

    def _layer(self, layer: int):
        try:
            return self._weights[int(layer)]
        except KeyError:
            raise KeyError(f"no predictor for layer {layer} (layers: {list(self.layers)})") from None

    def layer_weights(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(first [rank, hidden], second [neurons, rank], bias [neurons])`` of one layer:
        ``scores = bias + second @ (first @ x)``."""
        return self._layer(layer)

    # -- scores and masks ---------------------------------------------------------------
    def scores(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """Logits of "neuron active" for inputs ``x [..., hidden]`` -> ``[..., neurons]``."""
        first, second, bias = self._layer(layer)
        x = torch.as_tensor(x)
        if x.shape[-1] != self.hidden_size:
            raise ValueError(
                f"layer {layer}: input has {x.shape[-1]} features, predictors expect "
                f"hidden size {self.hidden_size}"
            )
        x = x.to(first.dtype)
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.hidden_size)
        out = torch.addmm(bias, flat @ first.T, second.T)
        return out.reshape(*lead, self.n_neurons)

    def mask(
        self,
        layer: int,
        x: torch.Tensor,
        *,
        target_recall: float | None = None,
        target_density: float | None = None,
        top_k: int | float | None = None,
    ) -> torch.Tensor:
        """Predicted active neurons, bool ``[..., neurons]``, under the stored policy or
        the one given here (thresholds then come from the calibration statistics)."""
        policy = Policy.from_kwargs(target_recall, target_density, top_k, default=None)
        return self._mask(layer, x, policy)

    def _mask(self, layer: int, x: torch.Tensor, policy: Policy | None) -> torch.Tensor:
        if policy is None:  # the fast path used at run time: stored threshold
            policy, threshold = self.policy, self.thresholds[self._check_layer(layer)]
        else:
            threshold = self._threshold(self._check_layer(layer), policy)
        scores = self.scores(layer, x)
        if policy.kind == "top_k":
            return top_k_mask(scores, policy.count(self.n_neurons))
        return scores > threshold

    def union_mask(self, layer: int, x: torch.Tensor, **policy) -> torch.Tensor:
        """OR of the masks of all rows of ``x``: the neurons a batch needs, bool ``[neurons]``."""
        mask = self.mask(layer, x, **policy)
        return mask.reshape(-1, self.n_neurons).any(0)

    def _check_layer(self, layer: int) -> int:
        self._layer(layer)
        return int(layer)

    def _threshold(self, layer: int, policy: Policy) -> float | None:
        if not policy.needs_threshold:
            return None
        if layer not in self._calibration:
            raise ValueError(
                f"no calibration statistics for layer {layer}: use predictors.calibrate(trace, ...)"
            )
        all_scores, positive_scores = self._calibration[layer]
        grid = all_scores if policy.kind == "density" else positive_scores
        if policy.kind == "recall" and bool(torch.isnan(grid).any()):
            raise ValueError(
                f"layer {layer}: no positive labels among the calibration tokens, cannot "
                "target a recall"
            )
        return threshold_from_quantiles(grid, float(policy.value))

    # -- policies -----------------------------------------------------------------------
    def with_policy(
        self,
        *,
        target_recall: float | None = None,
        target_density: float | None = None,
        top_k: int | float | None = None,
    ) -> Predictors:
        """A copy selecting neurons with another policy (weights shared, thresholds new).

            >>> p30 = predictors.with_policy(target_density=0.3)
        """
        policy = Policy.from_kwargs(target_recall, target_density, top_k, default=None)
        if policy is None:
            raise ValueError("give one of target_recall, target_density, top_k")
        return self._copy_with(policy, self._calibration)

    def _copy_with(self, policy: Policy, calibration: dict) -> Predictors:
        """A shallow copy (weights shared) with ``calibration`` and ``policy``'s thresholds."""
        out = copy.copy(self)
        out._calibration = calibration
        out.policy = policy
        out.thresholds = {layer: out._threshold(layer, policy) for layer in out.layers}
        return out

    def calibrate(
        self,
        trace,
        *,
        target_recall: float | None = None,
        target_density: float | None = None,
        top_k: int | float | None = None,
        seed: int = 0,
    ) -> Predictors:
        """A copy whose score statistics (and thresholds) come from ``trace``.

            >>> predictors.calibrate(other_trace, target_recall=0.9)

        Labels for a recall target use the predictors' own (fitted) rule.
        """
        policy = Policy.from_kwargs(target_recall, target_density, top_k, default=self.policy)
        self._check_trace(trace)
        g = torch.Generator().manual_seed(int(seed))
        calibration = {}
        for layer in self.layers:
            scores = self.scores(layer, self.inputs(trace, layer))
            labels = self.rule.mask(_source_values(trace, self.rule.source, layer), layer)
            calibration[layer] = (quantile_grid(scores, generator=g), quantile_grid(scores[labels], generator=g))
        return self._copy_with(policy, calibration)

    # -- quality ------------------------------------------------------------------------
    def evaluate(
        self,
        trace,
        layers: Iterable[int] | None = None,
        *,
        target_recall: float | None = None,
        target_density: float | None = None,
        top_k: int | float | None = None,
    ) -> pd.DataFrame:
        """Per-layer quality on ``trace`` (pass *held-out* sequences), one row per layer.

            >>> predictors.evaluate(test)[["layer", "recall", "predicted_density", "mass_kept"]]

        Columns: recall, precision, f1 (against the rule's labels), predicted_density and
        true_density (share of (token, neuron) pairs), mass_kept (share of ``|h|`` mass
        at predicted neurons), energy_kept (share of ``h**2``, which the squared output error
        follows more closely than ``|h|``), label_mass_kept (the rule's
        own mask), oracle_mass_kept (the best mask with the same per-token counts), plus
        rank, rule, policy, threshold, tokens. Micro-averaged over all tokens.
        """
        override = Policy.from_kwargs(target_recall, target_density, top_k, default=None)
        policy = override or self.policy
        self._check_trace(trace)
        layers = self.layers if layers is None else tuple(int(x) for x in layers)
        rows = []
        for layer in layers:
            pred = self._mask(layer, self.inputs(trace, layer), override)
            h = trace.activations(layer)
            labels = self.rule.mask(_source_values(trace, self.rule.source, layer), layer)
            tp, n_pred, n_true = _confusion(pred, labels)
            cells = max(pred.numel(), 1)
            rows.append(
                {
                    "layer": layer,
                    "rank": self.rank(layer),
                    "recall": tp / n_true if n_true else float("nan"),
                    "precision": tp / n_pred if n_pred else float("nan"),
                    "f1": _f1(tp, n_pred, n_true),
                    "predicted_density": n_pred / cells,
                    "true_density": n_true / cells,
                    "mass_kept": mass_kept(pred, h),
                    "energy_kept": energy_kept(pred, h),
                    "label_mass_kept": mass_kept(labels, h),
                    "oracle_mass_kept": oracle_mass_kept(pred, h),
                    "rule": self.rule.label,
                    "policy": policy.label,
                    "threshold": self._threshold(layer, policy) if policy.needs_threshold else float("nan"),
                    "lookahead": self.lookahead,
                    "n_tokens": trace.n_tokens,
                }
            )
        return pd.DataFrame(rows)

    def _check_trace(self, trace) -> None:
        if trace.n_neurons and trace.n_neurons != self.n_neurons:
            raise PredictorModelMismatch(
                f"trace has {trace.n_neurons} neurons per layer, predictors {self.n_neurons}"
            )
        if trace.hidden_size and trace.hidden_size != self.hidden_size:
            raise PredictorModelMismatch(
                f"trace has hidden size {trace.hidden_size}, predictors {self.hidden_size}"
            )
        other = trace.meta.get("model") or {}
        diffs = _identity_diffs(self.model, other)
        if diffs:
            raise PredictorModelMismatch(f"trace is of another model than the predictors: {diffs}")
        name = self.input_name
        if name not in trace.arrays:
            raise KeyError(
                f"trace has no {name!r} array, which these {'lookahead ' if self.lookahead else ''}"
                f"predictors read; record with store=(..., {name!r})"
            )

    def check_model(self, model) -> None:
        """Raise :class:`PredictorModelMismatch` unless ``model`` is the kind trained for."""
        from sparselab.models import model_identity

        identity = model_identity(model)
        mine = dict(self.model)
        mine.setdefault("hidden_size", self.hidden_size)
        mine.setdefault("intermediate_size", self.n_neurons)
        diffs = _identity_diffs(mine, identity)
        if diffs:
            raise PredictorModelMismatch(
                f"predictors were trained for another model: {diffs} "
                f"(predictors: {mine.get('name')!r}, model: {identity.get('name')!r})"
            )
        n_layers = identity["num_hidden_layers"]
        beyond = [layer for layer in self.layers if layer >= n_layers]
        if beyond:
            raise PredictorModelMismatch(
                f"predictors have layers {beyond}, the model has only {n_layers} layers"
            )

    # -- persistence --------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """JSON-able config: everything but the tensors."""
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "layers": list(self.layers),
            "ranks": {str(k): v for k, v in self.ranks.items()},
            "hidden_size": self.hidden_size,
            "intermediate_size": self.n_neurons,
            "rule": self.rule.describe(),
            "policy": self.policy.describe(),
            "thresholds": {str(k): v for k, v in self.thresholds.items()},
            "lookahead": self.lookahead,
            "input": self.input_name,
            "model": self.model,
            "activation": self.activation,
            "dtype": str(self.dtype).replace("torch.", ""),
            "n_params": self.n_params,
            "bytes": self.bytes,
            "training": self.config,
            "layer_info": {str(k): v for k, v in self.layer_info.items()},
            "versions": self.versions,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``predictors.safetensors`` + ``predictors.json`` into directory ``path``.

        Atomic: files go to a sibling temp directory which is then renamed into place.
        An existing directory is replaced only if it holds sparselab predictors.
        """
        from safetensors.torch import save_file

        path = Path(path)
        if path.exists() and not (
            path.is_dir() and ((path / CONFIG_FILE).is_file() or not any(path.iterdir()))
        ):
            raise FileExistsError(f"{path} exists and is not a sparselab predictors directory")
        tensors = {}
        for layer, (first, second, bias) in self._weights.items():
            tensors[f"layer.{layer}.first.weight"] = first.contiguous()
            tensors[f"layer.{layer}.second.weight"] = second.contiguous()
            tensors[f"layer.{layer}.second.bias"] = bias.contiguous()
        for layer, (all_q, pos_q) in self._calibration.items():
            tensors[f"layer.{layer}.quantiles.all"] = all_q.contiguous()
            tensors[f"layer.{layer}.quantiles.positive"] = pos_q.contiguous()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
        old = None
        try:
            save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT})
            config = self.describe()
            config["sha256"] = {WEIGHTS_FILE: _sha256(tmp / WEIGHTS_FILE)}
            (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=1, allow_nan=True))
            # mkdtemp makes a private (0700) directory; artefacts are meant to be shared
            for name in (WEIGHTS_FILE, CONFIG_FILE):
                os.chmod(tmp / name, 0o644)
            os.chmod(tmp, 0o755)
            if path.exists():
                old = path.parent / f".{path.name}.old-{os.getpid()}-{time.time_ns()}"
                os.replace(path, old)
            os.replace(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            if old is not None and not path.exists():
                os.replace(old, path)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, model=None) -> Predictors:
        """Read a directory written by :meth:`save`; with ``model``, check it matches.

            >>> predictors = sl.Predictors.load("smollm2.predictors", model=model)
        """
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = Path(path)
        config_path, weights_path = path / CONFIG_FILE, path / WEIGHTS_FILE
        if not path.is_dir():
            raise FileNotFoundError(f"no predictors directory at {path}")
        if not config_path.is_file():
            raise PredictorFileError(f"{path} holds no {CONFIG_FILE}: not a predictors directory")
        try:
            config = json.loads(config_path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise PredictorFileError(f"{config_path} is corrupted (not valid JSON): {err}") from err
        if not isinstance(config, dict) or config.get("format") != FORMAT:
            raise PredictorFileError(f"{config_path} is not a sparselab predictors config")
        if config.get("version", 0) > FORMAT_VERSION:
            raise PredictorFileError(
                f"{path} was written by a newer sparselab (format {config['version']}); upgrade"
            )
        if not weights_path.is_file():
            raise PredictorFileError(f"{path} is missing its weights file {WEIGHTS_FILE}")
        expected = (config.get("sha256") or {}).get(WEIGHTS_FILE)
        if expected is not None and _sha256(weights_path) != expected:
            raise PredictorFileError(
                f"{weights_path} is corrupted or was modified: its checksum does not match "
                f"the one recorded in {CONFIG_FILE}"
            )
        try:
            tensors = load_file(str(weights_path))
            layers = [int(x) for x in config["layers"]]
            weights = {
                layer: tuple(
                    tensors[f"layer.{layer}.{name}"]
                    for name in ("first.weight", "second.weight", "second.bias")
                )
                for layer in layers
            }
            calibration = {
                layer: (tensors[f"layer.{layer}.quantiles.all"], tensors[f"layer.{layer}.quantiles.positive"])
                for layer in layers
                if f"layer.{layer}.quantiles.all" in tensors
            }
            out = cls(
                weights,
                rule_from_dict(config["rule"]),
                policy=Policy(config["policy"]["kind"], config["policy"]["value"]),
                lookahead=config.get("lookahead", False),
                calibration=calibration,
                model=config.get("model"),
                activation=config.get("activation"),
                config=config.get("training"),
                layer_info={int(k): v for k, v in (config.get("layer_info") or {}).items()},
                versions=config.get("versions"),
            )
        except (SafetensorError, KeyError, TypeError, ValueError) as err:
            raise PredictorFileError(f"{path} is corrupted or incomplete: {err}") from err
        if model is not None:
            out.check_model(model)
        return out

    def __repr__(self) -> str:
        ranks = sorted(set(self.ranks.values()))
        rank = ranks[0] if len(ranks) == 1 else f"{ranks[0]}..{ranks[-1]}"
        return (
            f"Predictors(model={self.model.get('name')!r}, layers={len(self.layers)}, "
            f"rank={rank}, rule={self.rule.label}, policy={self.policy.label}, "
            f"lookahead={self.lookahead}, {self.bytes / 2**20:.1f} MiB)"
        )


def _identity_diffs(a: dict[str, Any], b: dict[str, Any]) -> str:
    """Human-readable differences between two model identities (keys both know)."""
    diffs = [
        f"{key} {a[key]!r} != {b[key]!r}"
        for key in IDENTITY_KEYS
        if a.get(key) is not None and b.get(key) is not None and a[key] != b[key]
    ]
    return ", ".join(diffs)


# --------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------


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
        values = _source_values(fit_trace, rule.source, layer)
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
    return Predictors(
        weights,
        rule,
        policy=policy,
        lookahead=lookahead,
        calibration=calibration,
        model=trace.meta.get("model"),
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
    return scores, rule.mask(_source_values(trace, rule.source, layer), layer)


def _validation_scores(fit, fit_trace, val_trace, rule, policy, lookahead, layer, g) -> dict:
    """F1 and mass kept on the validation sequences, thresholds chosen on the fit ones."""
    scores, labels = _scores_labels(fit, fit_trace, rule, lookahead, layer)
    val_scores, val_labels = _scores_labels(fit, val_trace, rule, lookahead, layer)
    if policy.kind == "top_k":
        pred = top_k_mask(val_scores, policy.count(val_scores.shape[-1]))
    else:
        grid = quantile_grid(scores if policy.kind == "density" else scores[labels], generator=g)
        pred = val_scores > threshold_from_quantiles(grid, float(policy.value))
    tp, n_pred, n_true = _confusion(pred, val_labels)
    return {
        "val_f1": _f1(tp, n_pred, n_true),
        "val_recall": tp / n_true if n_true else float("nan"),
        "val_mass_kept": mass_kept(pred, val_trace.activations(layer)) if "h" in val_trace.arrays else None,
    }


def _pick(candidates, tolerance: float):
    """Best validation F1; the smallest rank within ``tolerance`` of it (ranks ascending)."""
    best = max(entry["val_f1"] for entry, _ in candidates)
    for entry, fit in candidates:
        if entry["val_f1"] >= best - tolerance:
            return entry, fit
    return candidates[-1]
