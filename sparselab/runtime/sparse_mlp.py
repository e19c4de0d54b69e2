"""The sparse MLP: a stand-in for one decoder layer's gated MLP that computes only the
neurons of a chosen set (see :mod:`sparselab.runtime` for the modes).

    >>> wrapper = model.model.layers[3].mlp             # while sparsified
    >>> wrapper.last_mask.sum(), wrapper.cache          # the last set, the weight cache

Children are the original projections (same objects, same names), so parameters and
``state_dict`` keys are those of the dense model; the original module is kept
unregistered in ``original`` for :meth:`~sparselab.runtime.handle.SparseHandle.restore`.
All wrappers of one sparsified model share a :class:`RunState` (mode, predictors,
options, step counter, the stats records).

What a call computed can be watched (this is how :class:`sparselab.Recorder` records a
sparse model)::

    >>> handle = wrapper.observe(lambda call: print(call.computed.sum(-1)))
    >>> model(**batch); handle.remove()          # one SparseCall per forward of the layer

The fast kernels fuse ``h`` into the down projection and never hold it, so while an
observer is attached ``h`` of the computed neurons is computed once more in torch (float32)
from the same weights the kernel read (the model's, the int8 model's dequantized values, or
the weight file's rows): the same neurons, the kernel's values up to float rounding. With
no observer nothing extra runs.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from sparselab.masking.rules import Rule
from sparselab.models import LayerMLP
from sparselab.runtime.stats import StepTimes

__all__ = ["RunState", "SparseCall", "SparseMLP", "is_sparsified"]


def _no_clock() -> int:
    return 0


@dataclass
class RunState:
    """What every wrapper of one sparsified model shares."""

    mode: str
    activation: str
    predictors: Any  # a sparselab.prediction.MaskPredictor in predicted mode
    rule: Rule | None
    prefill: str
    use_cache: bool
    union: bool
    kernel: str
    record_stats: bool
    method: Any = None  # a sparselab.prediction.selection.SelectionMethod in method mode
    step: int = -1
    valid: torch.Tensor | None = None  # bool [B, S] of the current call (attention mask)
    records: list[tuple] = field(default_factory=list)  # StepStats rows, as tuples
    # method mode: layer -> [weight bytes read, tokens, dense MLP bytes per token]
    bytes_read: dict[int, list[float]] = field(default_factory=dict)
    window: int = 1  # the weight cache holds the neurons of the last `window` steps
    weight_file: Any = None  # an MLPWeightFile: MLP weights read from it, not from the model
    prefetch: bool = True  # start the reads of the rows a step needs before the kernel faults
    cache_capacity: float | None = None  # file-backed cache: rows held at most, share of a layer
    config: dict[str, Any] = field(default_factory=dict)  # sparsify's options (handle.config)
    fast_method: bool = False  # method mode: decode steps run the method's compiled selection

    @property
    def clock(self) -> Callable[[], int]:
        return time.perf_counter_ns if self.record_stats else _no_clock


@dataclass(frozen=True)
class SparseCall:
    """What one forward call of a :class:`SparseMLP` computed, handed to its observers.

        >>> handle = wrapper.observe(lambda call: calls.append(call))
        >>> calls[-1].h.shape, calls[-1].computed.dtype      # [..., neurons], torch.bool

    ``computed``: bool ``[..., neurons]`` (leading dims those of the MLP input), the
    neurons whose ``h`` reached the down projection for each token (every neuron in a
    dense prefill; the token's own mask with ``prefill="per_token"`` and in oracle mode,
    where the dense ``h`` is computed and then masked; the batch's union with
    ``union=True``). ``h`` = act(gate) * up and ``gate`` = act(gate) there, float32, 0
    elsewhere. ``phase`` is ``"prefill"`` or ``"decode"``.
    """

    layer: int
    phase: str
    h: torch.Tensor
    gate: torch.Tensor
    computed: torch.Tensor


def model_pre_hook(state: RunState):
    """A hook on the whole model: counts forward calls and keeps the attention mask."""
    def hook(module, args, kwargs):
        state.step += 1
        attn = kwargs.get("attention_mask")
        state.valid = attn.to(torch.bool) if isinstance(attn, torch.Tensor) and attn.dim() == 2 else None

    return hook


def _n_rows(x: torch.Tensor) -> int:
    return int(np.prod(x.shape[:-1]))


def _fused_selector(state: RunState, layer: int):
    """``(_fast.LowRankSelector, LowRankForm)`` when the layer's predictor has a float32
    low-rank form (:meth:`~sparselab.prediction.MaskPredictor.low_rank_form`), else
    ``(None, None)``: other forms keep their own ``mask`` in torch."""
    from sparselab import _fast

    if state.mode != "predicted":
        return None, None
    form = state.predictors.low_rank_form(layer)
    if form is None or form.first.dtype != torch.float32:
        return None, None
    return _fast.LowRankSelector(form.first, form.second, form.bias), form


class SparseMLP(nn.Module):
    """Stand-in for one decoder layer's gated MLP (see module docstring)."""

    is_sparselab_wrapper = True  # the model adapter does not re-verify a wrapper's formula

    def __init__(self, spec: LayerMLP, state: RunState, act_fn, *,
                 down_t: torch.Tensor | None = None, static_idx: torch.Tensor | None = None,
                 int8=None) -> None:
        super().__init__()
        original = spec.mlp
        object.__setattr__(self, "original", original)  # not a child: no duplicate params
        for name in spec.projections:  # registered under their own names: same state_dict
            setattr(self, name, getattr(original, name))
        # unregistered handles by role, whatever the architecture calls them
        object.__setattr__(self, "_gate_mod", spec.gate_proj)
        object.__setattr__(self, "_up_mod", spec.up_proj)
        object.__setattr__(self, "_down_mod", spec.down_proj)
        self.fused = spec.fused_gate_up
        self.layer_index = spec.index
        self.n_neurons = spec.n_neurons
        self.rt = state
        self._act_fn = act_fn
        self._weights = spec.gate_up_weights() if down_t is not None else None
        self.down_t = down_t
        self.static_idx = static_idx
        self.cache = None
        self._indexed = None  # by-index kernel with the weights checked once
        # on disk: [I, 3, H] bundled rows of a memory-mapped MLPWeightFile, read in place
        wf = state.weight_file
        self.bundle = wf.layer(spec.index) if wf is not None else None
        if self.bundle is not None:
            from sparselab import _fast

            prefetch = wf.prefetcher(spec.index) if state.prefetch else None
            self._indexed = _fast.BundleMLP(self.bundle, wf.dtype, state.activation, prefetch=prefetch)
            if state.mode == "predicted" and state.use_cache:
                limit = (None if state.cache_capacity is None
                         else max(1, min(self.n_neurons, math.ceil(state.cache_capacity * self.n_neurons))))
                # pre-sized: a bounded cache allocates its buffers once and never grows
                self.cache = _fast.WeightCache.from_bundle(self.bundle, wf.dtype, capacity=limit,
                                                           prefetch=prefetch)
                if limit is not None:
                    from sparselab.runtime.window import WindowedCache

                    self.cache = WindowedCache(self.cache, state.window, capacity=limit,
                                               overflow=self._indexed)
        elif down_t is not None and state.kernel == "fast":
            from sparselab import _fast

            # int8: (gate, up, down_t) Int8Rows; the kernels read them instead of the
            # (dequantized) model tensors
            gate_w, up_w, kdown_t = int8 if int8 is not None else (*self._weights, down_t)
            if state.mode == "predicted" and state.use_cache:
                self.cache = _fast.WeightCache(gate_w, up_w, down_t=kdown_t)
            else:
                self._indexed = _fast.IndexedMLP(gate_w, up_w, kdown_t, state.activation)
        if self.cache is not None and state.window > 1 and not hasattr(self.cache, "window"):
            from sparselab.runtime.window import WindowedCache

            self.cache = WindowedCache(self.cache, state.window)
        # decode-step selection fused in C (scores, selection, union) where it applies
        self._selector, self._form = (
            _fused_selector(state, spec.index)
            if (self._weights is not None or self.bundle is not None) and state.kernel == "fast"
            else (None, None))
        self.lookahead_input: torch.Tensor | None = None
        self._prev = np.zeros(self.n_neurons, dtype=bool)  # last mask (numpy), for churn
        self._prev_count = 0  # its neurons
        self._mlp_weights = None
        if state.mode == "method":
            from sparselab.prediction.selection import MLPWeights

            gate_w, up_w = spec.gate_up_weights()
            self._mlp_weights = MLPWeights(spec.index, gate_w, up_w, spec.down_proj.weight, act_fn)
        # method mode with a compiled decode step: (selector, (threshold, k), bytes of one
        # weight row, bytes of the selector's own weights)
        self._method_fast = None
        if state.mode == "method" and state.fast_method and self._indexed is not None:
            selector = state.method.fast_selector(spec.index, state.activation)
            row = spec.down_proj.out_features * spec.down_proj.weight.element_size()
            self._method_fast = (selector, state.method.fast_rule(spec.index, self.n_neurons),
                                 row, selector.nbytes)
        self.static_mask = None
        if static_idx is not None:
            self.static_mask = torch.zeros(self.n_neurons, dtype=torch.bool)
            self.static_mask[static_idx] = True
        # an OrderedDict, like torch's hook dicts: RemovableHandle keeps a weak reference
        self._observers: OrderedDict[int, Callable[[SparseCall], None]] = OrderedDict()

    # -- observers -----------------------------------------------------------------------
    def observe(self, fn: Callable[[SparseCall], None]) -> RemovableHandle:
        """Call ``fn(SparseCall)`` after every forward of this layer; remove with the handle.

            >>> handle = wrapper.observe(lambda call: print(call.computed.sum(-1)))
            >>> model(**batch); handle.remove()

        See :class:`SparseCall` for what is handed over and the module docstring for its
        cost (an extra torch computation of ``h`` over the computed neurons).
        """
        if not callable(fn):
            raise TypeError(f"observe() needs a callable, got {type(fn).__name__}")
        handle = RemovableHandle(self._observers)
        self._observers[handle.id] = fn
        return handle

    def _report(self, x: torch.Tensor, phase: str, computed: torch.Tensor,
                h: torch.Tensor | None = None, gate: torch.Tensor | None = None) -> None:
        """Hand observers this call's ``computed`` neurons (bool ``[N]`` shared by every
        row, or ``[..., N]`` per row) and their h and act(gate): given (already computed in
        torch, dense over the neurons: masked here), or computed here from the weights."""
        lead = x.shape[:-1]
        computed = computed.to(torch.bool).expand(*lead, self.n_neurons) \
            if computed.dim() == 1 else computed.reshape(*lead, self.n_neurons)
        keep = computed.to(torch.float32)
        if h is None:
            h, gate = self._set_values(x.reshape(-1, x.shape[-1]), computed.reshape(-1, self.n_neurons))
        h = h.reshape(*lead, self.n_neurons).float() * keep
        gate = gate.reshape(*lead, self.n_neurons).float() * keep
        call = SparseCall(self.layer_index, phase, h, gate, computed)
        for fn in list(self._observers.values()):
            fn(call)

    def _set_values(self, x2: torch.Tensor, computed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 (h, act(gate)) ``[T, N]`` over the neurons computed by any row (the
        others 0), from the gate and up rows the kernels read."""
        idx = torch.nonzero(computed.any(0)).squeeze(1)
        if self.bundle is not None:  # weights on disk: the file's rows, as the kernel reads them
            rows = torch.from_numpy(np.ascontiguousarray(self.bundle[idx.numpy(), :2]))
            if self.rt.weight_file.dtype == torch.bfloat16:
                rows = rows.view(torch.int16).view(torch.bfloat16)
            g, u = rows[:, 0], rows[:, 1]
        else:
            gate_w, up_w = self._weights
            g, u = gate_w.index_select(0, idx), up_w.index_select(0, idx)
        x32 = x2.detach().float()
        a_sub = self._act_fn(x32 @ g.float().T)
        h = torch.zeros(x2.shape[0], self.n_neurons, dtype=torch.float32)
        gate = torch.zeros_like(h)
        h[:, idx] = a_sub * (x32 @ u.float().T)
        gate[:, idx] = a_sub
        return h, gate

    def release(self) -> None:
        """Drop the kernels' views of the weights (the handle restores the layout first)."""
        self._observers.clear()
        self.down_t = None
        self.bundle = None
        self.cache = None
        self._indexed = None
        self._selector = self._form = None
        self._weights = None
        self._mlp_weights = None
        self._method_fast = None

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
            gate, up = self._gate_mod(x).chunk(2, dim=-1)
        else:
            gate, up = self._gate_mod(x), self._up_mod(x)
        a = self._act_fn(gate)
        return a * up, a

    def _rule_mask(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(h [T, N], act(gate) [T, N], true mask [T, N]) of the oracle rule."""
        h, a = self._dense_h(x)
        values = a if self.rt.rule.source == "gate" else h
        return h, a, self.rt.rule.mask(values, self.layer_index)

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
        px = px.to(self.rt.predictors.dtype)
        return self.rt.predictors.mask(self.layer_index, px).to(torch.bool)

    # -- sparse compute over one shared neuron set ---------------------------------------
    def _run_set(self, x2: torch.Tensor, mask: torch.Tensor | None, idx: torch.Tensor | None):
        """MLP of rows ``x2`` over one neuron set: (y, cache stats or None, t_cache, t_mlp)."""
        rt, clock = self.rt, self.rt.clock
        if rt.mode == "oracle":
            raise AssertionError("oracle mode never runs the sparse kernels")
        if self.cache is not None:
            t0 = clock()
            stats = self.cache.update(mask.numpy())
            t1 = clock()
            y = self.cache.forward(x2, rt.activation, out_dtype=x2.dtype)
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

    # -- statistics ----------------------------------------------------------------------
    def _record(self, phase: str, n_tokens: int, mask: torch.Tensor | np.ndarray | None,
                times: StepTimes, cache_stats=None, active: float | None = None,
                row: int = -1) -> None:
        """Append one :class:`StepStats` row; ``active=None`` counts the neurons of ``mask``
        (given with a mask, ``active`` must be its count)."""
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
                # one numpy pass (bool > bool: in now, not in prev): the decode step runs
                # this per layer, right after a kernel has evicted Python's data from cache
                added = int(np.count_nonzero(now > self._prev))
                removed = self._prev_count - (int(active) - added)
            if self.rt.kernel == "torch" and self.rt.mode != "oracle" and mask is not None:
                # the torch path gathers the active rows of gate, up and down on every call
                rows = int(active)
                nbytes = rows * 3 * self._down_mod.out_features * self._down_mod.weight.element_size()
        if now is not None:
            d = self.__dict__  # plain attributes: nn.Module.__setattr__ is slow
            d["_prev"], d["_prev_count"] = now, int(active)
        # a plain tuple in STAT_COLUMNS order (a StepStats row): no per-call object to build
        self.rt.records.append((
            self.rt.step, self.layer_index, phase, row, n_tokens, float(active),
            float(active) / self.n_neurons, added, removed, rows, nbytes,
            times.predictor, times.mask, times.cache, times.mlp,
        ))

    # -- forward -------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        decode = x.dim() == 2 or (x.dim() == 3 and x.shape[1] == 1)
        try:
            if self.rt.mode == "method":
                if decode and self._method_fast is not None and x.numel() == x.shape[-1]:
                    return self._decode_method_fast(x)
                if not decode and self.rt.prefill == "dense":
                    self._count_bytes(_n_rows(x) * self._dense_bytes, _n_rows(x))
                    return self._prefill_dense(x)
                return self._run_method(x, "decode" if decode else "prefill")
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

    def _run_method(self, x: torch.Tensor, phase: str) -> torch.Tensor:
        """Method mode: each token's selection, the MLP over exactly what it reads, and
        the bytes read counted (pad tokens included)."""
        from sparselab.prediction.selection import selected_h, selection_bytes

        clock = self.rt.clock
        x2 = x.reshape(-1, x.shape[-1])
        w = self._mlp_weights
        t0 = clock()
        selection = self.rt.method.select(x2, w)
        t1 = clock()
        h, a, keep = selected_h(x2, w, selection)  # == run_selection, h kept for observers
        y = torch.nn.functional.linear(h, w.down)
        t2 = clock()
        if self._observers:
            self._report(x, phase, torch.ones(self.n_neurons, dtype=torch.bool) if keep is None else keep,
                         h, a)
        self._count_bytes(float(selection_bytes(selection, w, x2.shape[0]).sum()), x2.shape[0])
        if self.rt.record_stats:
            active = float(self.n_neurons if keep is None else keep.sum(-1).double().mean())
            self._record(phase, x2.shape[0], None, StepTimes(predictor=t1 - t0, mlp=t2 - t1),
                         active=active)
        return y.reshape(x.shape)

    @property
    def _dense_bytes(self) -> int:
        """Bytes of this layer's dense MLP weights (method mode)."""
        from sparselab.prediction.selection import dense_mlp_bytes

        return dense_mlp_bytes(self._mlp_weights)

    def _count_bytes(self, nbytes: float, n_tokens: int) -> None:
        """Add what ``n_tokens`` tokens read to this layer's count (method mode; what
        :meth:`~sparselab.runtime.handle.SparseHandle.bytes_share` reports)."""
        log = self.rt.bytes_read.get(self.layer_index)
        if log is None:
            log = self.rt.bytes_read[self.layer_index] = [0.0, 0, float(self._dense_bytes)]
        log[0] += nbytes
        log[1] += n_tokens

    def _decode_method_fast(self, x: torch.Tensor) -> torch.Tensor:
        """One decode row in method mode: the method's compiled selection (e.g. the 4-bit
        shadow scores and a threshold), then the by-index kernel over the chosen rows;
        the bytes read are counted as :meth:`_run_method` counts them."""
        clock = self.rt.clock
        t0 = clock()
        x32 = x.detach().reshape(1, x.shape[-1])
        x32 = (x32 if x32.dtype == torch.float32 else x32.to(torch.float32)).contiguous().numpy()
        selector, (threshold, k), row, extra = self._method_fast
        if k is None:
            idx, mask = selector.select_unchecked(x32, threshold)
        else:
            idx, mask = selector.top_k_unchecked(x32, k)
        t1 = clock()
        y = self._indexed.run_unchecked(x32, idx)
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        t2 = clock()
        self._count_bytes(float(3 * len(idx) * row + extra), 1)
        if self.rt.record_stats:
            self._record("decode", 1, mask, StepTimes(predictor=t1 - t0, mlp=t2 - t1), active=len(idx))
        if self._observers:
            computed = torch.zeros(self.n_neurons, dtype=torch.bool)
            computed[torch.from_numpy(np.asarray(idx, dtype=np.int64))] = True
            self._report(x, "decode", computed)
        return y.view(x.shape)

    def _prefill_dense(self, x: torch.Tensor) -> torch.Tensor:
        clock = self.rt.clock
        t0 = clock()
        if self.bundle is not None:  # the weights are on disk: every neuron, read in place
            all_idx = np.arange(self.n_neurons, dtype=np.int64)
            y = self._indexed(x.reshape(-1, x.shape[-1]), all_idx).reshape(x.shape)
            if self._observers:
                self._report(x, "prefill", torch.ones(self.n_neurons, dtype=torch.bool))
        elif self._observers:  # the model's own modules, in the original's order of operations
            h, a = self._dense_h(x)
            y = self._down_mod(h)
            self._report(x, "prefill", torch.ones(self.n_neurons, dtype=torch.bool), h, a)
        else:
            y = self.original(x)
        self._record("prefill", _n_rows(x), None, StepTimes(mlp=clock() - t0), active=self.n_neurons)
        return y

    def _prefill_per_token(self, x: torch.Tensor) -> torch.Tensor:
        rt, clock = self.rt, self.rt.clock
        t0 = clock()
        t_pred = 0
        if rt.mode == "oracle":
            h, a, m = self._rule_mask(x)
        else:
            h, a = self._dense_h(x)
            if rt.mode == "static":
                m = self.static_mask.expand_as(h)
            else:
                m = self._predict(x.reshape(-1, x.shape[-1])).reshape(h.shape)
                t_pred = clock() - t0
        t1 = clock()
        y = self._down_mod(h * m)
        if self._observers:
            self._report(x, "prefill", m, h, a)
        active = float(m.reshape(-1, self.n_neurons).sum(1).double().mean())
        self._record("prefill", _n_rows(x), None,
                     StepTimes(predictor=t_pred, mask=t1 - t0 - t_pred, mlp=clock() - t1),
                     active=active)
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
            h, a, m = self._rule_mask(x2)
            u = (m if pos is None else m.index_select(0, pos)).any(0)
        else:
            m = self._predict(x2, pos)
            t_pred = clock() - t0
            u = m.any(0)
        t1 = clock()
        if rt.mode == "oracle":
            y = self._down_mod(h * u).reshape(x.shape)
            self._record("prefill", x2.shape[0], u, StepTimes(mask=t1 - t0, mlp=clock() - t1))
            if self._observers:
                self._report(x, "prefill", u, h, a)
            return y
        idx = self.static_idx if rt.mode == "static" else None
        y, cst, t_cache, t_mlp = self._run_set(x2, u, idx)
        self._record("prefill", x2.shape[0], u,
                     StepTimes(predictor=t_pred, mask=t1 - t0 - t_pred, cache=t_cache, mlp=t_mlp), cst)
        if self._observers:
            self._report(x, "prefill", u)
        return y.reshape(x.shape)

    def _decode(self, x: torch.Tensor) -> torch.Tensor:
        rt, clock = self.rt, self.rt.clock
        x2 = x.reshape(-1, x.shape[-1])
        if rt.mode == "static":
            y, cst, t_cache, t_mlp = self._run_set(x2, self.static_mask, self.static_idx)
            self._record("decode", x2.shape[0], self.static_mask, StepTimes(cache=t_cache, mlp=t_mlp),
                         cst, active=len(self.static_idx))
            if self._observers:
                self._report(x, "decode", self.static_mask)
            return y.reshape(x.shape)
        t0 = clock()
        if rt.mode == "oracle":
            h, a, m = self._rule_mask(x2)
            t1 = clock()
            if rt.union:
                u = m.any(0)
                y = self._down_mod(h * u)
                self._record("decode", x2.shape[0], u, StepTimes(mask=t1 - t0, mlp=clock() - t1))
            else:
                u = m
                y = self._down_mod(h * m)
                times = StepTimes(mask=t1 - t0, mlp=clock() - t1)
                for r in range(x2.shape[0]):
                    self._record("decode", 1, m[r], times, row=r)
            if self._observers:
                self._report(x, "decode", u, h, a)
            return y.reshape(x.shape)
        if self._selector is not None and (rt.union or x2.shape[0] == 1):
            return self._decode_selected(x, x2)
        m = self._predict(x2)
        t1 = clock()
        if rt.union:
            u = m.any(0)
            t2 = clock()
            y, cst, t_cache, t_mlp = self._run_set(x2, u, None)
            self._record("decode", x2.shape[0], u,
                         StepTimes(predictor=t1 - t0, mask=t2 - t1, cache=t_cache, mlp=t_mlp), cst)
            if self._observers:
                self._report(x, "decode", u)
            return y.reshape(x.shape)
        rows = []
        for r in range(x2.shape[0]):
            y_r, cst, t_cache, t_mlp = self._run_set(x2[r : r + 1], m[r], None)
            rows.append(y_r)
            self._record("decode", 1, m[r],
                         StepTimes(predictor=t1 - t0 if r == 0 else 0, cache=t_cache, mlp=t_mlp),
                         cst, row=r)
        if self._observers:
            self._report(x, "decode", m)
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
        form = self._form
        if form.top_k is None:
            idx, mask = self._selector.select_unchecked(px32, form.threshold)
        else:
            idx, mask = self._selector.top_k_unchecked(px32, form.top_k)
        t1 = clock()
        if self.cache is not None:
            stats = self.cache.update(mask)
            t2 = clock()
            y = self.cache.forward(x2, self.rt.activation, out_dtype=x2.dtype)
        else:
            stats, t2 = None, t1
            y = self._indexed.run_unchecked(x32, idx)
            if y.dtype != x.dtype:
                y = y.to(x.dtype)
        self._record("decode", x2.shape[0], mask,
                     StepTimes(predictor=t1 - t0, cache=t2 - t1, mlp=clock() - t2), stats,
                     active=len(idx))
        if self._observers:
            computed = torch.zeros(self.n_neurons, dtype=torch.bool)
            computed[torch.from_numpy(np.asarray(idx, dtype=np.int64))] = True
            self._report(x, "decode", computed)
        return y.reshape(x.shape)


def is_sparsified(model: nn.Module) -> bool:
    """Whether any decoder layer of ``model`` currently runs a :class:`SparseMLP`."""
    return any(isinstance(m, SparseMLP) for m in model.modules())
