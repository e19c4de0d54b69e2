"""Run a model sparsely: swap each gated MLP for a wrapper that computes only active neurons.

    >>> with sl.sparsify(model, predictors, mode="predicted") as handle:
    ...     out = model.generate(**batch, max_new_tokens=32)
    >>> handle.stats().groupby("layer").active.mean()       # model is dense again here

Modes:

- ``"predicted"``: predictor(x) -> mask per row -> union over the batch (OR) ->
  ``_fast.WeightCache.update`` (paired replacement, cost ~ churn) -> sparse MLP over the
  cache's rows. ``use_cache=False`` runs the direct kernel over the index list instead;
  ``union=False`` gives every batch row its own mask.
- ``"oracle"``: dense compute, then the rule's true mask applied to ``h = act(gate)*up``
  before ``down``: the best quality any predictor with that rule could reach.
- ``"static"``: one fixed neuron set per layer (e.g. the most frequent ones,
  :func:`static_from_trace`), run with the direct kernel.

Decode steps (one new token per row) run sparse. Prefill (several tokens per row) is dense
by default; ``prefill="union"`` computes all prefill tokens with one union mask,
``prefill="per_token"`` applies each token's own mask in torch (what teacher-forced
quality evaluation needs). The wrapper keeps the original ``gate_proj``/``up_proj``/
``down_proj`` as its children, so ``state_dict()`` keys are unchanged and no weight is
duplicated: the kernels need ``down`` transposed (``[I, H]`` row-major); it is rewritten in
that layout *in its own memory* and ``down_proj.weight`` becomes a transposed view of it;
``restore()`` rewrites the original layout in place, bit for bit. Convert the model's dtype
or device before sparsifying, not while sparsified.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from sparselab.models import LayerMLP, ModelAdapter, adapter_for
from sparselab.rules import Rule, TopK

MODES = ("predicted", "oracle", "static")
KERNELS = ("fast", "torch")
PREFILLS = ("dense", "union", "per_token")
STAT_COLUMNS = (
    "step", "layer", "phase", "row", "n_tokens", "active", "density", "added", "removed",
    "rows_copied", "bytes_moved", "t_predictor_ns", "t_mask_ns", "t_cache_ns", "t_mlp_ns",
)


class AlreadySparsifiedError(RuntimeError):
    """Raised by :func:`sparsify` on a model whose MLPs are already wrapped."""


def _no_clock() -> int:
    return 0


# --------------------------------------------------------------------------------------
# helpers shared with sparselab.evaluate
# --------------------------------------------------------------------------------------


def static_from_trace(trace, rule: Rule | None = None, density: float = 0.5,
                      layers: Iterable[int] | None = None) -> dict[int, np.ndarray]:
    """The ``density`` share of neurons most often active under ``rule``, per layer.

        >>> static = sl.sparse.static_from_trace(train_trace, sl.rules.TopK(0.5), density=0.5)
        >>> sl.sparsify(model, mode="static", static_neurons=static)

    ``rule`` defaults to ``TopK(density)``. Ties in frequency are broken by the mean
    ``|h|`` (a neuron that is rarely top but large when it is should win). Returns sorted
    int64 index arrays keyed by model layer number.
    """
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    rule = TopK(keep=density) if rule is None else rule
    if not rule.fitted:
        rule = rule.fit(trace)
    layers = trace.layers if layers is None else tuple(int(i) for i in layers)
    missing = sorted(set(layers) - set(trace.layers))
    if missing:
        raise ValueError(f"trace has no recording of layers {missing} (has {trace.layers})")
    n = trace.n_neurons
    k = max(1, int(round(density * n)))
    out = {}
    for layer in layers:
        values = trace._get(rule.source, layer)
        freq = rule.mask(values, layer).sum(0).double()
        mag = values.abs().double().mean(0)
        # frequency is an integer: adding a value in [0, 0.5) only breaks its ties
        score = freq + 0.5 * mag / (mag.max() + 1e-30)
        idx = score.topk(k).indices.sort().values
        out[layer] = idx.numpy().astype(np.int64)
    return out


def predictors_at_density(predictors, density: float | None):
    """Predictors re-thresholded to keep a share ``density`` of neurons per token.

        >>> p30 = sl.sparse.predictors_at_density(predictors, 0.3)

    Uses ``predictors.with_policy(target_density=...)`` when the predictors provide it;
    otherwise wraps them so that each token keeps its top ``density`` share of scores.
    ``density=None`` returns the predictors unchanged.
    """
    if density is None:
        return predictors
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    if hasattr(predictors, "with_policy"):
        return predictors.with_policy(target_density=density)
    return _TopKScores(predictors, density)


class _TopKScores:
    """Predictors whose mask is the top ``density`` share of their scores per token."""

    def __init__(self, inner, density: float) -> None:
        self.inner, self.density = inner, density
        self.layers, self.lookahead = inner.layers, inner.lookahead

    @property
    def bytes(self) -> int:
        return self.inner.bytes

    def scores(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        return self.inner.scores(layer, x)

    def mask(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        return TopK(keep=self.density).mask(self.scores(layer, x), layer)

    def union_mask(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        return self.mask(layer, x).any(0)


def _predictor_dtype(predictors) -> torch.dtype:
    dtype = getattr(predictors, "dtype", None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


# --------------------------------------------------------------------------------------
# runtime state shared by the wrappers of one handle
# --------------------------------------------------------------------------------------


@dataclass
class _Runtime:
    mode: str
    activation: str
    predictors: Any
    rule: Rule | None
    prefill: str
    use_cache: bool
    union: bool
    kernel: str
    record_stats: bool
    step: int = -1
    valid: torch.Tensor | None = None  # bool [B, S] of the current call (attention mask)
    records: list[tuple] = field(default_factory=list)

    @property
    def clock(self):
        return time.perf_counter_ns if self.record_stats else _no_clock


def _model_pre_hook(runtime: _Runtime):
    def hook(module, args, kwargs):
        runtime.step += 1
        attn = kwargs.get("attention_mask")
        runtime.valid = attn.to(torch.bool) if isinstance(attn, torch.Tensor) and attn.dim() == 2 else None

    return hook


# --------------------------------------------------------------------------------------
# the wrapper
# --------------------------------------------------------------------------------------


class SparseMLP(nn.Module):
    """Stand-in for one decoder layer's gated MLP (see module docstring).

    Children are the original projections (same objects, same names), so parameters and
    ``state_dict`` keys are those of the dense model. The original module itself is kept
    unregistered in ``original`` for :meth:`SparseHandle.restore`.
    """

    def __init__(self, spec: LayerMLP, runtime: _Runtime, act_fn, *,
                 down_t: torch.Tensor | None = None, static_idx: torch.Tensor | None = None) -> None:
        super().__init__()
        original = spec.mlp
        object.__setattr__(self, "original", original)  # not a child: no duplicate params
        self.fused = spec.fused_gate_up
        if self.fused:
            self.gate_up_proj = original.gate_up_proj
        else:
            self.gate_proj = original.gate_proj
            self.up_proj = original.up_proj
        self.down_proj = original.down_proj
        self.layer_index = spec.index
        self.n_neurons = spec.n_neurons
        self.rt = runtime
        self._act_fn = act_fn
        self._weights = spec.gate_up_weights() if down_t is not None else None
        self.down_t = down_t
        self.static_idx = static_idx
        self.cache = None
        self._indexed = None  # by-index kernel with the weights checked once
        if down_t is not None and runtime.kernel == "fast":
            from sparselab import _fast

            gate_w, up_w = self._weights
            if runtime.mode == "predicted" and runtime.use_cache:
                self.cache = _fast.WeightCache(gate_w, up_w, down_t=down_t)
            else:
                self._indexed = _fast.IndexedMLP(gate_w, up_w, down_t, runtime.activation)
        # decode-step selection fused in C (scores, threshold, union) where it applies
        self._selector, self._threshold = (
            _selector_for(runtime, spec.index) if self._weights is not None and runtime.kernel == "fast"
            else (None, None))
        self.lookahead_input: torch.Tensor | None = None
        self._prev = np.zeros(self.n_neurons, dtype=bool)  # last mask (numpy), for churn
        self.static_mask = None
        if static_idx is not None:
            self.static_mask = torch.zeros(self.n_neurons, dtype=torch.bool)
            self.static_mask[static_idx] = True

    @property
    def last_mask(self) -> torch.Tensor:
        """Bool ``[n_neurons]``: the neuron set of the last call that chose one (all False
        before the first). After a decode step this is the set the step computed with
        (the union over the batch, or the last row's set with ``union=False``). Kept only
        while statistics are recorded (``record_stats=True``, the default)."""
        return torch.from_numpy(self._prev)

    def extra_repr(self) -> str:
        return f"layer={self.layer_index}, mode={self.rt.mode!r}, kernel={self.rt.kernel!r}"

    # -- dense pieces (the model's own modules, so density 1.0 is bit-identical) ---------
    def _dense_h(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(h = act(gate) * up, act(gate)) computed with the model's own projections."""
        if self.fused:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        a = self._act_fn(gate)
        return a * up, a

    def _rule_mask(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(h [T, N], true mask [T, N]) of the oracle rule."""
        h, a = self._dense_h(x)
        values = a if self.rt.rule.source == "gate" else h
        return h, self.rt.rule.mask(values, self.layer_index)

    def _predictor_input(self, x2: torch.Tensor) -> torch.Tensor:
        """What the predictor reads: the MLP input rows, or the input norm's output."""
        if not self.rt.predictors.lookahead:
            return x2
        if self.lookahead_input is None:
            raise RuntimeError(
                f"layer {self.layer_index}: lookahead predictors need the input norm's "
                "output, but the hook did not see it (was the MLP called on its own?)"
            )
        return self.lookahead_input.reshape(-1, self.lookahead_input.shape[-1])

    def _predict(self, x2: torch.Tensor, flat_positions: torch.Tensor | None = None) -> torch.Tensor:
        """Predicted bool mask [T, N] for the rows of ``x2`` (the MLP input, [T, H])."""
        px = self._predictor_input(x2)
        if flat_positions is not None:
            px = px.index_select(0, flat_positions)
        px = px.to(_predictor_dtype(self.rt.predictors))
        return self.rt.predictors.mask(self.layer_index, px).to(torch.bool)

    # -- sparse compute over one shared neuron set ---------------------------------------
    def _run_set(self, x2: torch.Tensor, mask: torch.Tensor | None, idx: torch.Tensor | None):
        """MLP of rows ``x2`` over one neuron set. Returns (y, cache stats or None, t_cache, t_mlp)."""
        rt, clock = self.rt, self.rt.clock
        if rt.mode == "oracle":
            raise AssertionError("oracle mode never runs the sparse kernels")
        if self.cache is not None:
            t0 = clock()
            stats = self.cache.update(mask.numpy())
            t1 = clock()
            y = self.cache.forward(x2, rt.activation)
            return y, stats, t1 - t0, clock() - t1
        if idx is None:
            idx = torch.from_numpy(np.flatnonzero(mask.numpy()))
        t0 = clock()
        if self._indexed is not None:
            y = self._indexed(x2, idx.numpy())
        else:
            gate_w, up_w = self._weights
            g = gate_w.index_select(0, idx)
            u = up_w.index_select(0, idx)
            d = self.down_t.index_select(0, idx)
            y = (self._act_fn(x2 @ g.T) * (x2 @ u.T)) @ d
        return y, None, 0, clock() - t0

    # -- recording -----------------------------------------------------------------------
    def _record(self, phase: str, row: int, n_tokens: int, active: float | None,
                mask: torch.Tensor | np.ndarray | None, cache_stats, t_pred: int, t_mask: int, t_cache: int,
                t_mlp: int) -> None:
        """Append one stats row; ``active=None`` counts the neurons of ``mask``."""
        if not self.rt.record_stats:
            return
        now = None if mask is None else (mask if isinstance(mask, np.ndarray) else mask.numpy())
        if active is None:
            active = int(np.count_nonzero(now))
        if cache_stats is not None:
            added, removed = cache_stats.added, cache_stats.removed
            rows, nbytes = cache_stats.rows_copied, cache_stats.bytes_moved
        else:
            added = removed = rows = nbytes = 0
            if now is not None:
                # numpy on the shared buffers: a few us, where four torch ops cost ~25
                changed = now != self._prev
                added = int(np.count_nonzero(changed & now))
                removed = int(np.count_nonzero(changed)) - added
            if self.rt.kernel == "torch" and self.rt.mode != "oracle" and mask is not None:
                # the torch path gathers the active rows of gate, up and down on every call
                rows = int(active)
                nbytes = rows * 3 * self.down_proj.out_features * self.down_proj.weight.element_size()
        if now is not None:
            self.__dict__["_prev"] = now  # plain attribute: nn.Module.__setattr__ is slow
        self.rt.records.append((
            self.rt.step, self.layer_index, phase, row, n_tokens, float(active),
            float(active) / self.n_neurons, added, removed, rows, nbytes,
            t_pred, t_mask, t_cache, t_mlp,
        ))

    # -- forward -------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        decode = x.dim() == 2 or (x.dim() == 3 and x.shape[1] == 1)
        try:
            if decode:
                return self._decode(x)
            if self.rt.prefill == "dense":
                return self._prefill_dense(x)
            if self.rt.prefill == "per_token":
                return self._prefill_per_token(x)
            return self._prefill_union(x)
        finally:
            if self.lookahead_input is not None:  # nn.Module.__setattr__ costs us per call
                self.lookahead_input = None

    def _prefill_dense(self, x: torch.Tensor) -> torch.Tensor:
        clock = self.rt.clock
        t0 = clock()
        y = self.original(x)
        self._record("prefill", -1, _n_rows(x), self.n_neurons, None, None, 0, 0, 0, clock() - t0)
        return y

    def _prefill_per_token(self, x: torch.Tensor) -> torch.Tensor:
        rt, clock = self.rt, self.rt.clock
        t0 = clock()
        t_pred = 0
        if rt.mode == "oracle":
            h, m = self._rule_mask(x)
        else:
            h, _ = self._dense_h(x)
            if rt.mode == "static":
                m = self.static_mask.expand_as(h)
            else:
                m = self._predict(x.reshape(-1, x.shape[-1])).reshape(h.shape)
                t_pred = clock() - t0
        t1 = clock()
        y = self.down_proj(h * m)
        active = float(m.reshape(-1, self.n_neurons).sum(1).double().mean())
        self._record("prefill", -1, _n_rows(x), active, None, None, t_pred, t1 - t0 - t_pred, 0,
                     clock() - t1)
        return y

    def _valid_positions(self, x: torch.Tensor) -> torch.Tensor | None:
        """Flat indices of the attended (non-pad) tokens of ``x`` [B, S, H], if known."""
        valid = self.rt.valid
        if valid is None or x.dim() != 3 or valid.shape[0] != x.shape[0] or valid.shape[1] < x.shape[1]:
            return None
        return torch.nonzero(valid[:, -x.shape[1]:].reshape(-1)).squeeze(1)

    def _prefill_union(self, x: torch.Tensor) -> torch.Tensor:
        rt, clock = self.rt, self.rt.clock
        x2 = x.reshape(-1, x.shape[-1])
        pos = self._valid_positions(x)
        t0 = clock()
        t_pred = 0
        if rt.mode == "static":
            u = self.static_mask
        elif rt.mode == "oracle":
            h, m = self._rule_mask(x2)
            u = (m if pos is None else m.index_select(0, pos)).any(0)
        else:
            m = self._predict(x2, pos)
            t_pred = clock() - t0
            u = m.any(0)
        t1 = clock()
        if rt.mode == "oracle":
            y = self.down_proj(h * u).reshape(x.shape)
            self._record("prefill", -1, x2.shape[0], None, u, None, 0, t1 - t0, 0, clock() - t1)
            return y
        idx = self.static_idx if rt.mode == "static" else None
        y, cst, t_cache, t_mlp = self._run_set(x2, u, idx)
        self._record("prefill", -1, x2.shape[0], None, u, cst, t_pred, t1 - t0 - t_pred,
                     t_cache, t_mlp)
        return y.reshape(x.shape)

    def _decode(self, x: torch.Tensor) -> torch.Tensor:
        rt, clock = self.rt, self.rt.clock
        x2 = x.reshape(-1, x.shape[-1])
        if rt.mode == "static":
            y, cst, t_cache, t_mlp = self._run_set(x2, self.static_mask, self.static_idx)
            self._record("decode", -1, x2.shape[0], len(self.static_idx), self.static_mask, cst, 0, 0,
                         t_cache, t_mlp)
            return y.reshape(x.shape)
        t0 = clock()
        if rt.mode == "oracle":
            h, m = self._rule_mask(x2)
            t1 = clock()
            if rt.union:
                u = m.any(0)
                y = self.down_proj(h * u)
                self._record("decode", -1, x2.shape[0], None, u, None, 0, t1 - t0, 0, clock() - t1)
            else:
                y = self.down_proj(h * m)
                t2 = clock()
                for r in range(x2.shape[0]):
                    self._record("decode", r, 1, None, m[r], None, 0, t1 - t0, 0, t2 - t1)
            return y.reshape(x.shape)
        if self._selector is not None and (rt.union or x2.shape[0] == 1):
            return self._decode_selected(x, x2)
        m = self._predict(x2)
        t1 = clock()
        if rt.union:
            u = m.any(0)
            t2 = clock()
            y, cst, t_cache, t_mlp = self._run_set(x2, u, None)
            self._record("decode", -1, x2.shape[0], None, u, cst, t1 - t0, t2 - t1,
                         t_cache, t_mlp)
            return y.reshape(x.shape)
        rows = []
        for r in range(x2.shape[0]):
            y_r, cst, t_cache, t_mlp = self._run_set(x2[r : r + 1], m[r], None)
            rows.append(y_r)
            self._record("decode", r, 1, None, m[r], cst, t1 - t0 if r == 0 else 0, 0,
                         t_cache, t_mlp)
        return torch.cat(rows).reshape(x.shape)


    def _decode_selected(self, x: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        """Predicted decode step with the fused selector: the same neuron set as
        ``_predict(x2).any(0)`` (up to float rounding at the threshold), in one C call."""
        clock = self.rt.clock
        t0 = clock()
        # rows as float32 numpy once (no copy for a float32 model); the selector and the
        # kernel then skip their argument checks: the shapes are the model's own
        x32 = x2.detach().to(torch.float32).contiguous().numpy()
        px = self._predictor_input(x2)
        px32 = x32 if px is x2 else px.detach().to(torch.float32).contiguous().numpy()
        idx, mask = self._selector.select_unchecked(px32, self._threshold)
        t1 = clock()
        if self.cache is not None:
            stats = self.cache.update(mask)
            t2 = clock()
            y = self.cache.forward(x2, self.rt.activation)
        else:
            stats, t2 = None, t1
            y = self._indexed.run_unchecked(x32, idx)
            if y.dtype != x.dtype:
                y = y.to(x.dtype)
        self._record("decode", -1, x2.shape[0], len(idx), mask, stats, t1 - t0, 0, t2 - t1,
                     clock() - t2)
        return y.reshape(x.shape)


def _selector_for(runtime: _Runtime, layer: int):
    """``(_fast.LowRankSelector, threshold)`` for a layer whose predictor is a float32
    :class:`~sparselab.predictors.Predictors` with a threshold policy, else ``(None, None)``
    (top-k policies and other scorers keep the torch path)."""
    from sparselab import _fast
    from sparselab.predictors import Predictors

    p = runtime.predictors
    if runtime.mode != "predicted" or not isinstance(p, Predictors):
        return None, None
    threshold = p.thresholds.get(int(layer))  # None under a top-k policy
    first, second, bias = p.layer_weights(layer)
    if threshold is None or first.dtype != torch.float32:
        return None, None
    return _fast.LowRankSelector(first, second, bias), float(threshold)


def _n_rows(x: torch.Tensor) -> int:
    return int(np.prod(x.shape[:-1]))


# --------------------------------------------------------------------------------------
# the handle
# --------------------------------------------------------------------------------------


class SparseHandle:
    """What :func:`sparsify` returns: restores the dense model and holds the run's stats.

        >>> with sl.sparsify(model, mode="oracle", rule=sl.rules.TopK(0.5)) as h:
        ...     model(**batch)
        >>> h.stats().head()

    ``restore()`` is idempotent and also runs when a ``with`` block exits by an exception.
    """

    def __init__(self, model: nn.Module, adapter: ModelAdapter, runtime: _Runtime,
                 wrappers: dict[int, SparseMLP], hooks: list, config: dict[str, Any]) -> None:
        self.model = model
        self.adapter = adapter
        self._rt = runtime
        self.wrappers = wrappers
        self._hooks = hooks
        self.config = config
        self.active = True

    # -- info ------------------------------------------------------------------------------
    @property
    def mode(self) -> str:
        return self._rt.mode

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(self.wrappers)

    @property
    def caches(self) -> dict[int, Any]:
        """Layer -> ``_fast.WeightCache`` (predicted mode with ``use_cache``)."""
        return {i: w.cache for i, w in self.wrappers.items() if w.cache is not None}

    @property
    def extra_bytes(self) -> int:
        """Bytes held beyond the dense model: the caches' active rows (down_t replaces down)."""
        return int(sum(c.capacity * 3 * c.hidden * c.dtype.itemsize for c in self.caches.values()))

    def __repr__(self) -> str:
        state = "active" if self.active else "restored"
        return f"SparseHandle(mode={self.mode!r}, layers={len(self.wrappers)}, {state})"

    # -- stats -----------------------------------------------------------------------------
    def stats(self) -> pd.DataFrame:
        """One row per forward call, layer (and batch row when ``union=False``).

        Columns: step (model forward call since sparsify/reset), layer, phase
        ("prefill"/"decode"), row (-1 = whole batch), n_tokens, active (neurons computed;
        mean per token for per-token prefill), density, added/removed (churn against the
        layer's previous mask), rows_copied/bytes_moved (cache or torch gather traffic),
        and nanoseconds in predictor, mask+union, cache update and MLP kernel.
        """
        df = pd.DataFrame.from_records(self._rt.records, columns=list(STAT_COLUMNS))
        df.insert(0, "mode", self.mode)
        df.attrs["config"] = dict(self.config)
        return df

    def reset_stats(self) -> None:
        """Forget recorded stats and restart step numbering."""
        self._rt.records.clear()
        self._rt.step = -1

    # -- restore ---------------------------------------------------------------------------
    def restore(self) -> None:
        """Put the original MLP modules back (idempotent). The down weight becomes a
        contiguous tensor again, so dense logits are bit-identical to before."""
        if not self.active:
            return
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        scratch: list = []
        for i, wrapper in self.wrappers.items():
            spec = self.adapter.layers[i]
            if spec.layer.mlp is wrapper:
                spec.layer.mlp = wrapper.original
            if wrapper.down_t is not None:
                _untranspose_in_place(wrapper.original.down_proj.weight, wrapper.down_t, scratch)
                wrapper.down_t = None
            wrapper.cache = None
            wrapper._weights = None
        self.active = False

    def __enter__(self) -> SparseHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


# --------------------------------------------------------------------------------------
# sparsify
# --------------------------------------------------------------------------------------


def is_sparsified(model: nn.Module) -> bool:
    """Whether any decoder layer of ``model`` currently runs a :class:`SparseMLP`."""
    return any(isinstance(m, SparseMLP) for m in model.modules())


def _check_choice(name: str, value, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; expected one of {tuple(choices)}")


def _check_predictors(predictors, adapter: ModelAdapter, layers: tuple[int, ...], dtype) -> None:
    for attr in ("mask", "layers", "lookahead"):
        if not hasattr(predictors, attr):
            raise ValueError(f"predictors lack .{attr}: expected a sl.Predictors "
                             f"(got {type(predictors).__name__})")
    missing = sorted(set(layers) - {int(i) for i in predictors.layers})
    if missing:
        raise ValueError(f"predictors have no predictor for layers {missing} "
                         f"(they cover {sorted(predictors.layers)}); pass layers=")
    hidden = adapter.layers[0].down_proj.out_features
    n = adapter.n_neurons
    probe = torch.zeros(2, hidden, dtype=_predictor_dtype(predictors))
    layer = layers[0]
    try:
        out = predictors.mask(layer, probe)
    except (RuntimeError, ValueError) as err:
        raise ValueError(f"predictors do not fit this model (hidden size {hidden}, "
                         f"{n} neurons): {err}") from err
    if tuple(out.shape) != (2, n):
        raise ValueError(f"predictors were made for another model shape: layer {layer} "
                         f"predicts {tuple(out.shape)[-1]} neurons, the model has {n}")


def _check_static(static: Mapping, adapter: ModelAdapter, layers: tuple[int, ...]) -> dict[int, torch.Tensor]:
    missing = sorted(set(layers) - {int(k) for k in static})
    if missing:
        raise ValueError(f"static_neurons has no neuron set for layers {missing}")
    n = adapter.n_neurons
    out = {}
    for layer in layers:
        idx = torch.as_tensor(np.asarray(static[layer] if layer in static else static[str(layer)]))
        if idx.dim() != 1 or idx.dtype.is_floating_point or idx.dtype == torch.bool:
            raise ValueError(f"static_neurons[{layer}] must be a 1-D integer index array")
        idx = idx.to(torch.int64)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
            raise ValueError(f"static_neurons[{layer}] has indices outside [0, {n})")
        if idx.unique().numel() != idx.numel():
            raise ValueError(f"static_neurons[{layer}] has duplicate indices")
        out[layer] = idx.sort().values
    return out


def sparsify(
    model: nn.Module,
    predictors=None,
    mode: str = "predicted",
    rule: Rule | None = None,
    density: float | None = None,
    static_neurons: Mapping[int, Any] | None = None,
    layers: Iterable[int] | None = None,
    prefill: str = "dense",
    use_cache: bool = True,
    union: bool = True,
    kernel: str = "fast",
    record_stats: bool = True,
) -> SparseHandle:
    """Swap the gated MLPs of ``model`` for sparse ones, in place; returns a handle.

        >>> handle = sl.sparsify(model, predictors, mode="predicted")
        >>> model.generate(**batch, max_new_tokens=32); handle.stats()
        >>> handle.restore()                                 # or use it as `with ... as h:`

    - ``mode``: ``"predicted"`` (needs ``predictors``; ``density`` re-thresholds them, see
      :func:`predictors_at_density`), ``"oracle"`` (``rule``, or ``density`` for
      ``TopK(density)``), ``"static"`` (``static_neurons`` {layer: indices}, or a Trace
      from which :func:`static_from_trace` takes the ``density`` most frequent neurons
      under ``rule``).
    - ``layers``: model layer numbers to sparsify (default: all, or those the predictors
      or static sets cover); the others stay dense.
    - ``prefill``: ``"dense"``, ``"union"`` (one mask over all prompt tokens), or
      ``"per_token"`` (each token's own mask, applied in torch).
    - ``use_cache=False``: direct gather kernel instead of the weight cache;
      ``union=False``: per-row masks instead of one union per batch (oracle mode too).
    - ``kernel``: ``"fast"`` (sparselab._fast) or ``"torch"`` (index_select + matmul).

    Every argument is checked before the model is touched: a ``ValueError`` names the
    problem and leaves the model unchanged.
    """
    # ---- validation (no state changes) -------------------------------------------------
    _check_choice("mode", mode, MODES)
    _check_choice("kernel", kernel, KERNELS)
    _check_choice("prefill", prefill, PREFILLS)
    if density is not None and not (isinstance(density, (int, float)) and 0.0 < density <= 1.0):
        raise ValueError(f"density must be in (0, 1], got {density!r}")
    if rule is not None and not isinstance(rule, Rule):
        raise ValueError(f"rule must be a sparselab.rules rule, got {type(rule).__name__}")
    adapter = adapter_for(model)
    if is_sparsified(model):
        raise AlreadySparsifiedError(
            "this model is already sparsified: call .restore() on its handle (or leave its "
            "`with` block) before sparsifying it again"
        )
    n_layers = adapter.n_layers
    requested = None if layers is None else tuple(int(i) for i in layers)
    if requested is not None:
        bad = [i for i in requested if not 0 <= i < n_layers]
        if bad or len(set(requested)) != len(requested):
            raise ValueError(f"layers must be distinct numbers in [0, {n_layers}), got {list(requested)}")
    weight = adapter.layers[0].down_proj.weight
    dtype = weight.dtype

    static_idx: dict[int, torch.Tensor] = {}
    if mode == "predicted":
        if predictors is None:
            raise ValueError('mode="predicted" needs predictors (sl.train_predictors(...)); '
                             'use mode="oracle" or "static" without them')
        predictors = predictors_at_density(predictors, density)
        chosen = requested if requested is not None else tuple(
            int(i) for i in predictors.layers if 0 <= int(i) < n_layers)
        if not chosen:
            raise ValueError(f"predictors cover layers {list(predictors.layers)}, none of "
                             f"which exists in this {n_layers}-layer model")
        _check_predictors(predictors, adapter, chosen, dtype)
    elif mode == "oracle":
        if rule is None and density is None:
            raise ValueError('mode="oracle" needs a rule (e.g. sl.rules.TopK(0.5)) or a density')
        rule = TopK(keep=density) if rule is None else rule
        if not rule.fitted:
            raise ValueError(f"rule {rule.label} is not fitted: call rule.fit(trace) first")
        chosen = requested if requested is not None else tuple(range(n_layers))
        thresholds = getattr(rule, "thresholds", None)
        if thresholds:
            missing = sorted(set(chosen) - set(thresholds))
            if missing:
                raise ValueError(f"rule {type(rule).__name__} has no threshold for layers {missing}")
    else:
        if static_neurons is None:
            raise ValueError('mode="static" needs static_neurons: {layer: indices} or a Trace '
                             "(see sl.sparse.static_from_trace)")
        if not isinstance(static_neurons, Mapping):
            if density is None:
                raise ValueError("static mode from a trace needs a density")
            static_neurons = static_from_trace(static_neurons, rule, density,
                                               layers=requested)
        chosen = requested if requested is not None else tuple(
            int(k) for k in static_neurons if 0 <= int(k) < n_layers)
        if not chosen:
            raise ValueError("static_neurons has no set for any layer of this model")
        static_idx = _check_static(static_neurons, adapter, chosen)

    if mode != "oracle":
        if any(getattr(adapter.layers[i].down_proj, "bias", None) is not None
               or (adapter.layers[i].gate_proj.bias is not None) for i in chosen):
            raise ValueError("the sparse kernels do not support MLP biases; use mode='oracle'")
        for i in chosen:
            if not adapter.layers[i].down_proj.weight.is_contiguous():
                raise ValueError(f"layer {i}: down_proj.weight is not contiguous (is the model "
                                 "sparsified by something else?)")
        if weight.device.type != "cpu":
            raise ValueError(f"sparse kernels run on the CPU; the model is on {weight.device}")
        if kernel == "fast":
            from sparselab import _fast

            if adapter.activation not in _fast.ACTIVATIONS:
                raise ValueError(f"kernel='fast' has no {adapter.activation!r} activation "
                                 f"(has {_fast.ACTIVATIONS}); use kernel='torch'")
            if dtype not in (torch.float32, torch.bfloat16):
                raise ValueError(f"kernel='fast' runs float32 or bfloat16 weights, the model "
                                 f"is {dtype}; use kernel='torch'")
            for i in chosen:
                for w in adapter.layers[i].gate_up_weights():
                    if not w.is_contiguous():
                        raise ValueError(f"layer {i}: gate/up weights are not contiguous")

    # ---- build (undo everything if anything fails) --------------------------------------
    runtime = _Runtime(mode=mode, activation=adapter.activation, predictors=predictors,
                       rule=rule, prefill=prefill, use_cache=use_cache, union=union,
                       kernel=kernel, record_stats=record_stats)
    config = {
        "mode": mode, "layers": list(chosen), "prefill": prefill, "use_cache": use_cache,
        "union": union, "kernel": kernel, "density": density,
        "rule": rule.describe() if rule is not None else None,
        "static_sizes": {i: int(v.numel()) for i, v in static_idx.items()} or None,
        "lookahead": bool(getattr(predictors, "lookahead", False)) if predictors is not None else None,
        "activation": adapter.activation, "dtype": str(dtype).replace("torch.", ""),
    }
    wrappers: dict[int, SparseMLP] = {}
    hooks: list = []
    handle = SparseHandle(model, adapter, runtime, wrappers, hooks, config)
    scratch: list = []
    try:
        hooks.append(model.register_forward_pre_hook(_model_pre_hook(runtime), with_kwargs=True))
        for i in chosen:
            spec = adapter.layers[i]
            original = spec.mlp
            act_fn = getattr(original, "act_fn", None) or getattr(original, "activation_fn", None) \
                or adapter.act_fn
            down = original.down_proj.weight
            down_t = _transpose_in_place(down, scratch) if mode != "oracle" else None
            try:
                wrapper = SparseMLP(spec, runtime, act_fn, down_t=down_t,
                                    static_idx=static_idx.get(i))
            except BaseException:
                if down_t is not None:
                    _untranspose_in_place(down, down_t, scratch)
                raise
            wrappers[i] = wrapper
            spec.layer.mlp = wrapper
            if mode == "predicted" and predictors.lookahead:
                hooks.append(spec.input_norm.register_forward_hook(_lookahead_hook(wrapper)))
    except BaseException:
        handle.restore()
        raise
    return handle


def _scratch_for(weight: torch.Tensor, scratch: list) -> torch.Tensor:
    """One reusable buffer of ``weight``'s size: a fresh transient per layer would leave the
    allocator holding ~one down matrix per layer of freed-but-resident memory."""
    if not scratch or scratch[0].numel() < weight.numel() or scratch[0].dtype != weight.dtype:
        scratch[:] = [torch.empty(weight.numel(), dtype=weight.dtype)]
    return scratch[0][: weight.numel()]


def _transpose_in_place(weight: nn.Parameter, scratch: list | None = None) -> torch.Tensor:
    """Rewrite ``weight`` [H, I] as ``down_t`` [I, H] row-major *in its own memory*.

    The parameter then holds the transposed view ``down_t.t()`` (same values, so dense
    calls still work). Writing into the same memory, rather than allocating a new
    ``down_t``, matters: weights loaded from safetensors live in a private file mapping
    whose pages stay resident when the tensor is dropped, so a fresh copy would add the
    whole down matrix to the process's RSS. Only one layer's [I, H] is ever transient.
    """
    w = weight.data
    hidden, n = w.shape
    tmp = _scratch_for(w, [] if scratch is None else scratch).view(n, hidden)
    tmp.copy_(w.t())
    down_t = torch.as_strided(w, (n, hidden), (hidden, 1))
    down_t.copy_(tmp)
    weight.data = down_t.t()
    return down_t


def _untranspose_in_place(weight: nn.Parameter, down_t: torch.Tensor,
                          scratch: list | None = None) -> None:
    """Inverse of :func:`_transpose_in_place`: the original contiguous [H, I] layout and
    values (bit for bit), in the same memory."""
    n, hidden = down_t.shape
    tmp = _scratch_for(down_t, [] if scratch is None else scratch).view(hidden, n)
    tmp.copy_(down_t.t())
    w = torch.as_strided(down_t, (hidden, n), (n, 1))
    w.copy_(tmp)
    weight.data = w


def _lookahead_hook(wrapper: SparseMLP):
    def hook(module, inputs, output):
        wrapper.lookahead_input = output

    return hook
