"""Trained low-rank predictors: from the hidden state, guess which MLP neurons matter.

    >>> predictors = sl.train_predictors(train, rank=64)       # one predictor per layer
    >>> predictors.evaluate(test)[["layer", "recall", "mass_kept"]]
    >>> predictors.mask(3, x)                                  # bool [tokens, neurons]
    >>> predictors.with_policy(target_density=0.3).save("smollm2.predictors")

Each layer's predictor is ``hidden -> rank -> intermediate``: two linear maps without a
nonlinearity (bias on the second), whose outputs are the logits of "this neuron is
active" (training: :mod:`.training`). Scores become masks through a *policy*
(:class:`~.policy.Policy`) kept with the predictors: a per-layer threshold reaching a target
density or a target recall on the training tokens, or the top-k scores of every token.
Per-layer score sketches from training are stored, so :meth:`Predictors.with_policy`
re-thresholds without the trace; :meth:`Predictors.calibrate` recomputes them from another
trace. Files: :mod:`.files`.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from sparselab.masking.rules import Rule
from sparselab.masking.thresholds import quantile_grid, threshold_from_quantiles, top_k_mask
from sparselab.prediction.identity import PredictorModelMismatch, identity_diffs
from sparselab.prediction.policy import Policy
from sparselab.prediction.protocol import LowRankForm
from sparselab.prediction.scoring import (
    confusion,
    energy_share,
    f1_score,
    mass_share,
    oracle_mass_share,
)

__all__ = ["Predictors", "low_rank_scores"]


def low_rank_scores(first: torch.Tensor, second: torch.Tensor, bias: torch.Tensor,
                    x: torch.Tensor) -> torch.Tensor:
    """``bias + second @ (first @ x)`` for inputs ``x [..., hidden]`` -> ``[..., neurons]``
    (``x`` cast to the weights' dtype)."""
    x = x.to(first.dtype)
    lead = x.shape[:-1]
    out = torch.addmm(bias, x.reshape(-1, first.shape[1]) @ first.T, second.T)
    return out.reshape(*lead, second.shape[0])


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

    @property
    def calibration(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Layer -> (sketch of all scores, sketch of the scores of true positives), the
        statistics thresholds are chosen from (see :func:`~sparselab.masking.thresholds.quantile_grid`)."""
        return dict(self._calibration)

    def low_rank_form(self, layer: int) -> LowRankForm:
        """The layer's weights and selection for the fused C selector (part of
        :class:`~sparselab.prediction.protocol.MaskPredictor`)."""
        first, second, bias = self._layer(layer)
        if self.policy.kind == "top_k":
            return LowRankForm(first, second, bias, top_k=self.policy.count(self.n_neurons))
        return LowRankForm(first, second, bias, threshold=self.thresholds[int(layer)])

    def at_density(self, density: float) -> Predictors:
        """A copy keeping a share ``density`` of neurons (calibrated thresholds)."""
        return self.with_policy(target_density=density)

    def layer_weights(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(first [rank, hidden], second [neurons, rank], bias [neurons])`` of one layer:
        ``scores = bias + second @ (first @ x)``."""
        return self._layer(layer)

    # -- scores and masks ---------------------------------------------------------------
    def scores(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """Logits of "neuron active" for inputs ``x [..., hidden]`` -> ``[..., neurons]``."""
        x = torch.as_tensor(x)
        if x.shape[-1] != self.hidden_size:
            raise ValueError(
                f"layer {layer}: input has {x.shape[-1]} features, predictors expect "
                f"hidden size {self.hidden_size}"
            )
        return low_rank_scores(*self._layer(layer), x)

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
            labels = self.rule.mask(trace.values(self.rule.source, layer), layer)
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
            labels = self.rule.mask(trace.values(self.rule.source, layer), layer)
            tp, n_pred, n_true = confusion(pred, labels)
            cells = max(pred.numel(), 1)
            rows.append(
                {
                    "layer": layer,
                    "rank": self.rank(layer),
                    "recall": tp / n_true if n_true else float("nan"),
                    "precision": tp / n_pred if n_pred else float("nan"),
                    "f1": f1_score(tp, n_pred, n_true),
                    "predicted_density": n_pred / cells,
                    "true_density": n_true / cells,
                    "mass_kept": mass_share(pred, h),
                    "energy_kept": energy_share(pred, h),
                    "label_mass_kept": mass_share(labels, h),
                    "oracle_mass_kept": oracle_mass_share(pred, h),
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
        diffs = identity_diffs(self.model, other)
        if diffs:
            raise PredictorModelMismatch(f"trace is of another model than the predictors: {diffs}")
        name = self.input_name
        if name not in trace.arrays:
            raise KeyError(
                f"trace has no {name!r} array, which these {'lookahead ' if self.lookahead else ''}"
                f"predictors read; record with store=(..., {name!r})"
            )

    def check_model(self, model, check_weights: bool = True) -> None:
        """Raise :class:`PredictorModelMismatch` unless ``model`` is the one trained for.

            >>> predictors.check_model(model)            # sizes, type, then MLP weights

        Compares the identity (type and sizes) and, when the predictors carry one (those
        trained on a trace recorded by this version), the MLP weight fingerprint of
        :mod:`sparselab.models.fingerprint`: the same weights in bfloat16 or int8 pass,
        other weights of the same shapes do not. ``check_weights=False`` skips the weights.
        """
        from sparselab.models import model_identity

        identity = model_identity(model)
        mine = dict(self.model)
        mine.setdefault("hidden_size", self.hidden_size)
        mine.setdefault("intermediate_size", self.n_neurons)
        diffs = identity_diffs(mine, identity)
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
        saved = self.model.get("mlp_fingerprint")
        if check_weights and saved is not None:
            from sparselab.models.fingerprint import fingerprint_diffs, mlp_fingerprint

            diffs = fingerprint_diffs(saved, mlp_fingerprint(model))
            if diffs:
                raise PredictorModelMismatch(
                    f"the model's MLP weights are not those the predictors were trained on: "
                    f"{diffs} (shapes match; distance = change of the weight probes relative "
                    f"to their RMS). Pass check_weights=False to load them anyway"
                )

    # -- persistence --------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """JSON-able config: everything but the tensors."""
        return {
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
        """Write the predictors into directory ``path`` (atomic; see :mod:`.files`)."""
        from sparselab.prediction.files import save_predictors

        return save_predictors(self, path)

    @classmethod
    def load(cls, path: str | os.PathLike, model=None, check_weights: bool = True) -> Predictors:
        """Read a directory written by :meth:`save`; with ``model``, check it matches.

            >>> predictors = sl.Predictors.load("smollm2.predictors", model=model)

        ``check_weights=False`` skips the comparison of MLP weight fingerprints (see
        :meth:`check_model`); sizes are always compared.
        """
        from sparselab.prediction.files import load_predictors

        return load_predictors(path, model=model, check_weights=check_weights)

    def __repr__(self) -> str:
        ranks = sorted(set(self.ranks.values()))
        rank = ranks[0] if len(ranks) == 1 else f"{ranks[0]}..{ranks[-1]}"
        return (
            f"Predictors(model={self.model.get('name')!r}, layers={len(self.layers)}, "
            f"rank={rank}, rule={self.rule.label}, policy={self.policy.label}, "
            f"lookahead={self.lookahead}, {self.bytes / 2**20:.1f} MiB)"
        )
