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
  :func:`~sparselab.prediction.static_from_trace`), run with the direct kernel.
- ``"method"``: any :class:`~sparselab.prediction.selection.SelectionMethod` (oracle,
  shadow, TEAL, WINA, CATS, two-stage, a wrapped predictor; ``method=``, or passed as
  ``predictors``): every token, in every phase, computes the MLP from exactly the weights
  its selection reads (in torch, by masking: quality, not speed), and the handle counts
  those bytes (:meth:`~sparselab.runtime.handle.SparseHandle.bytes_share`).

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

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from sparselab._checks import check_choice, check_fraction
from sparselab._fast.quant import INT8_FORMATS, quantize_mlp_int8
from sparselab.masking.rules import Rule, TopK
from sparselab.models import ModelAdapter, activation_module, adapter_for
from sparselab.prediction.protocol import MaskPredictor
from sparselab.prediction.static import static_from_trace
from sparselab.runtime.handle import SparseHandle
from sparselab.runtime.layout import transpose_in_place, untranspose_in_place
from sparselab.runtime.sparse_mlp import RunState, SparseMLP, is_sparsified, model_pre_hook
from sparselab.runtime.weight_file import drop_layer_weights

__all__ = ["DISK_CACHE_WINDOW", "KERNELS", "PREFILLS", "SPARSIFY_MODES", "AlreadySparsifiedError", "is_sparsified", "sparsify"]

SPARSIFY_MODES = ("predicted", "oracle", "static", "method")
KERNELS = ("fast", "torch")
PREFILLS = ("dense", "union", "per_token")
# "model", then the int8 formats (quant.INT8_FORMATS: how each layer is quantized)
WEIGHT_FORMATS = ("model", *INT8_FORMATS)


class AlreadySparsifiedError(RuntimeError):
    """Raised by :func:`sparsify` on a model whose MLPs are already wrapped."""


_PROTOCOL_MEMBERS = ("layers", "lookahead", "hidden_size", "n_neurons", "bytes", "dtype", "mask",
                     "low_rank_form", "at_density", "describe")


def _check_predictors_protocol(predictors) -> None:
    if not isinstance(predictors, MaskPredictor):
        lacking = [name for name in _PROTOCOL_MEMBERS if not hasattr(predictors, name)]
        raise ValueError(f"predictors lack {', '.join('.' + n for n in lacking)}: expected a "
                         f"sl.Predictors or any sparselab.prediction.MaskPredictor "
                         f"(got {type(predictors).__name__})")


def _check_predictors(predictors, adapter: ModelAdapter, layers: tuple[int, ...]) -> None:
    missing = sorted(set(layers) - {int(i) for i in predictors.layers})
    if missing:
        raise ValueError(f"predictors have no predictor for layers {missing} "
                         f"(they cover {sorted(predictors.layers)}); pass layers=")
    hidden = adapter.layers[0].down_proj.out_features
    n = adapter.n_neurons
    probe = torch.zeros(2, hidden, dtype=predictors.dtype)
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


DISK_CACHE_WINDOW = 4  # the default window of a cache filled from a weight file (bench_disk)


def sparsify(
    model: nn.Module,
    predictors=None,
    mode: str = "predicted",
    rule: Rule | None = None,
    density: float | None = None,
    static_neurons: Mapping[int, Any] | None = None,
    layers: Iterable[int] | None = None,
    prefill: str | None = None,
    use_cache: bool = True,
    union: bool = True,
    kernel: str = "fast",
    record_stats: bool = True,
    method=None,
    weight_file=None,
    cache_window: int | None = None,
    prefetch: bool = True,
    weights: str = "model",
    cache_capacity: float | None = None,
) -> SparseHandle:
    """Swap the gated MLPs of ``model`` for sparse ones, in place; returns a handle.

        >>> handle = sl.sparsify(model, predictors, mode="predicted")
        >>> model.generate(**batch, max_new_tokens=32); handle.stats()
        >>> handle.restore()                                 # or use it as `with ... as h:`

    - ``mode``: ``"predicted"`` (needs ``predictors``, any
      :class:`~sparselab.prediction.MaskPredictor`; ``density`` re-thresholds them with
      their ``at_density``), ``"oracle"`` (``rule``, or ``density`` for
      ``TopK(density)``), ``"static"`` (``static_neurons`` {layer: indices}, or a Trace
      from which :func:`static_from_trace` takes the ``density`` most frequent neurons
      under ``rule``).
    - ``layers``: model layer numbers to sparsify (default: all, or those the predictors
      or static sets cover); the others stay dense.
    - ``prefill``: ``"dense"`` (the default, but in mode ``"method"``), ``"union"`` (one
      mask over all prompt tokens), or ``"per_token"`` (each token's own mask, applied in
      torch; the default in mode ``"method"``).
    - ``use_cache=False``: direct gather kernel instead of the weight cache;
      ``union=False``: per-row masks instead of one union per batch (oracle mode too).
    - ``kernel``: ``"fast"`` (sparselab._fast) or ``"torch"`` (index_select + matmul).
    - ``method``: a fitted :class:`~sparselab.prediction.selection.SelectionMethod`
      (mode ``"method"``, also when passed as ``predictors``); every token gets its own
      selection (``prefill="per_token"``, what quality evaluation measures), or prefill
      runs dense and only decode steps select (``prefill="dense"``, the usual deployment:
      the prompt costs what it costs dense); ``use_cache`` and ``union`` do not apply. With
      ``kernel="fast"`` a method that has a compiled decode step (``method.fast_decode``:
      ``Shadow(..., x_bits=8)``) runs single-row decode steps as its compiled selection
      then the by-index kernel over the chosen rows (the same rows as its ``select``, up
      to float32 rounding at the threshold); prefill and batched steps stay in torch.
    - ``weight_file``: an :class:`~sparselab.runtime.weight_file.MLPWeightFile` (or its
      path) written from this model: the sparsified layers' MLP weights are then dropped
      from RAM and read from the memory-mapped file (the cache's rows are filled from it,
      the direct kernel and dense prefill read it in place); ``restore()`` reads them back.
      Not with ``mode="oracle"``, ``kernel="torch"`` or ``prefill="per_token"``.
      ``prefetch`` (default True): before a kernel reads a step's rows from the file, their
      reads are started together (``madvise(MADV_WILLNEED)``) instead of one fault at a time.
    - ``cache_window``: the weight cache holds the neurons of the last ``k`` decode steps
      (LLM in a Flash's window; each step still computes only its own set). Default None:
      1 with the weights in RAM, :data:`DISK_CACHE_WINDOW` (4) with ``weight_file`` (in
      experiments/results/bench_disk_smollm2.md, k = 4 loaded 27 % fewer rows per token
      than k = 1 under the 50 % cap, as few as k = 8 or 16, and was the fastest uncapped).
    - ``cache_capacity`` (with ``weight_file`` and the cache): the most rows each layer's
      cache holds, as a share of its neurons (float in (0, 1]); its buffers are allocated
      once at that size and never grow, so the cache's memory is known before the first
      token (what a memory cap needs). A step's own neurons come first, then the window's
      newest first while they fit; neurons of a step beyond it are read from the file in
      place by the direct kernel. Default None: the cache grows to what it must hold.
    - ``weights``: ``"model"`` (the model's own), ``"int8"``, ``"int8_b64"``,
      ``"int8_rows"`` or ``"int8_rowcol"``: the sparsified layers' MLP weights are quantized
      to int8 (``_fast.quant.INT8_FORMATS``; a float32 scale per block of 32 or 64 weights,
      or per row: gate and up by neuron, down by column; ``"int8_rowcol"``: per row, and
      down also per output channel, 1 byte per weight like per row; on SmolLM2, dense,
      perplexity against fp32 +0.7 % / +0.0 % / +3.6 % / -0.2 %, KL 0.0025 / 0.0044 /
      0.032 / 0.0017, ``experiments/quality_int8x.py``), the fast kernels read
      the int8 bytes, and the model's own tensors are set to the dequantized values while
      sparsified (so dense prefill and torch paths compute the same int8 model;
      ``restore()`` puts the originals back bit for bit). float32 models only.

    Every argument is checked before the model is touched: a ``ValueError`` names the
    problem and leaves the model unchanged.
    """
    # ---- validation (no state changes) -------------------------------------------------
    from sparselab.prediction.selection import SelectionMethod

    if method is None and isinstance(predictors, SelectionMethod):
        method, predictors = predictors, None
    if method is not None and mode == "predicted":
        mode = "method"
    if method is not None and mode != "method":
        raise ValueError(f'method= runs in mode="method", not mode={mode!r}')
    check_choice("mode", mode, SPARSIFY_MODES)
    check_choice("kernel", kernel, KERNELS)
    if prefill is None:  # a method selects for every token unless told to prefill dense
        prefill = "per_token" if mode == "method" else "dense"
    check_choice("prefill", prefill, PREFILLS)
    if mode == "method" and prefill == "union":
        raise ValueError('mode="method" selects per token: prefill must be "per_token" or '
                         '"dense", not "union"')
    check_choice("weights", weights, WEIGHT_FORMATS)
    if density is not None:
        density = check_fraction("density", density)
    if cache_window is None:
        cache_window = 1 if weight_file is None else DISK_CACHE_WINDOW
    if isinstance(cache_window, bool) or not isinstance(cache_window, (int, np.integer)) or cache_window < 1:
        raise ValueError(f"cache_window must be an int >= 1, got {cache_window!r}")
    if cache_capacity is not None:
        if isinstance(cache_capacity, bool) or not isinstance(cache_capacity, (float, int, np.floating)) \
                or not 0.0 < float(cache_capacity) <= 1.0:
            raise ValueError(f"cache_capacity must be a share of each layer's neurons in (0, 1], "
                             f"got {cache_capacity!r}")
        if weight_file is None or not use_cache or mode != "predicted":
            raise ValueError("cache_capacity bounds the weight cache of a model run from a "
                             "weight_file= (mode='predicted', use_cache=True)")
        cache_capacity = float(cache_capacity)
    if weight_file is not None:
        from sparselab.runtime.weight_file import MLPWeightFile

        if weights != "model":
            raise ValueError(f"weight_file= holds the model's float weights: not with weights={weights!r}")
        if mode in ("oracle", "method") or kernel != "fast" or prefill == "per_token":
            raise ValueError("weight_file= runs the fast kernels from disk: not with mode='oracle', "
                             "mode='method', kernel='torch' or prefill='per_token' (they need the "
                             "weights in RAM)")
        if not isinstance(weight_file, MLPWeightFile):
            weight_file = MLPWeightFile(weight_file)
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
    if weights != "model" and dtype != torch.float32:
        raise ValueError(f"weights={weights!r} quantizes a float32 model, the model is {dtype}")

    static_idx: dict[int, torch.Tensor] = {}
    # a method with a compiled decode step (Shadow(bits=4, x_bits=8)): decode steps run its
    # selection and the by-index kernel; other calls compute its selection in torch
    fast_method = (mode == "method" and kernel == "fast" and weights == "model"
                   and bool(getattr(method, "fast_decode", False)))
    if mode == "predicted":
        if predictors is None:
            raise ValueError('mode="predicted" needs predictors (sl.train_predictors(...)); '
                             'use mode="oracle" or "static" without them')
        _check_predictors_protocol(predictors)
        predictors = predictors if density is None else predictors.at_density(density)
        chosen = requested if requested is not None else tuple(
            int(i) for i in predictors.layers if 0 <= int(i) < n_layers)
        if not chosen:
            raise ValueError(f"predictors cover layers {list(predictors.layers)}, none of "
                             f"which exists in this {n_layers}-layer model")
        _check_predictors(predictors, adapter, chosen)
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
    elif mode == "method":
        if method is None or not isinstance(method, SelectionMethod):
            raise ValueError('mode="method" needs method=, a sparselab.prediction.selection.'
                             f"SelectionMethod (got {type(method).__name__})")
        if not method.fitted:
            raise ValueError(f"method {method!r} is not fitted: call method.fit(model, trace) "
                             "with a trace of training text first")
        chosen = requested if requested is not None else tuple(range(n_layers))
    else:
        if static_neurons is None:
            raise ValueError('mode="static" needs static_neurons: {layer: indices} or a Trace '
                             "(see sl.prediction.static_from_trace)")
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

    if mode not in ("oracle", "method") or fast_method:
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

    if weight_file is not None:
        weight_file.check_model(model, chosen)

    # ---- build (undo everything if anything fails) --------------------------------------
    runtime = RunState(mode=mode, activation=adapter.activation, predictors=predictors,
                       rule=rule, prefill=prefill, use_cache=use_cache, union=union,
                       kernel=kernel, record_stats=record_stats, method=method,
                       window=int(cache_window), weight_file=weight_file, prefetch=bool(prefetch),
                       cache_capacity=cache_capacity, fast_method=fast_method)
    config = {
        "mode": mode, "layers": list(chosen), "prefill": prefill, "use_cache": use_cache,
        "union": union, "kernel": kernel, "density": density,
        "rule": rule.describe() if rule is not None else None,
        "static_sizes": {i: int(v.numel()) for i, v in static_idx.items()} or None,
        "lookahead": bool(getattr(predictors, "lookahead", False)) if predictors is not None else None,
        "activation": adapter.activation, "dtype": str(dtype).replace("torch.", ""),
        "cache_window": int(cache_window), "prefetch": bool(prefetch), "cache_capacity": cache_capacity,
        "weight_file": None if weight_file is None else str(weight_file.path),
        "weights": weights, "fast_method_decode": fast_method,
    }
    if method is not None:
        config["method"] = method.describe()
    runtime.config = config  # what a Recorder on the sparse model writes in the trace's meta
    wrappers: dict[int, SparseMLP] = {}
    hooks: list = []
    handle = SparseHandle(model, adapter, runtime, wrappers, hooks, config)
    scratch: list = []
    originals: list = []  # (tensor, saved values) of int8-quantized weights
    if weights != "model":
        handle.post_restore.append(lambda: put_back(originals))
    try:
        hooks.append(model.register_forward_pre_hook(model_pre_hook(runtime), with_kwargs=True))
        for i in chosen:
            spec = adapter.layers[i]
            # the model's own activation module: density 1.0 is then bit-identical to dense
            act_fn = activation_module(spec.mlp) or adapter.act_fn
            down = spec.down_proj.weight
            int8 = (quantize_layer_in_place(spec, originals, **INT8_FORMATS[weights])
                    if weights != "model" else None)
            down_t = (transpose_in_place(down, scratch)
                      if (mode not in ("oracle", "method") or fast_method) and weight_file is None
                      else None)
            try:
                wrapper = SparseMLP(spec, runtime, act_fn, down_t=down_t,
                                    static_idx=static_idx.get(i), int8=int8)
            except BaseException:
                if down_t is not None:
                    untranspose_in_place(down, down_t, scratch)
                raise
            wrappers[i] = wrapper
            setattr(spec.layer, spec.attr, wrapper)
            if weight_file is not None:
                drop_layer_weights(spec)
            if mode == "predicted" and predictors.lookahead:
                hooks.append(_attach_lookahead(spec, wrapper))
    except BaseException:
        handle.restore()
        raise
    return handle


def quantize_layer_in_place(spec, originals: list, block: int | None,
                            down_col_scales: bool = False):
    """int8 (gate, up, down_t) of one layer (scales per ``block`` weights, or per row; with
    ``down_col_scales`` down also per output channel); the layer's tensors get the
    dequantized values, their originals are appended to ``originals`` for :func:`put_back`.
    Down is quantized as its transpose, i.e. per neuron.

        >>> saved = []
        >>> for spec in adapter_for(model).layers: quantize_layer_in_place(spec, saved, 32)
        >>> put_back(saved)                                  # the float weights again
    """
    gate_w, up_w = spec.gate_up_weights()
    down = spec.down_proj.weight
    qg, qu, qd = quantize_mlp_int8(gate_w, up_w, down.t(), block, down_col_scales)
    with torch.no_grad():
        for t, deq in ((gate_w, qg.dequantize()), (up_w, qu.dequantize()),
                       (down, qd.dequantize().t())):
            originals.append((t, t.detach().clone()))
            t.copy_(deq)
    return qg, qu, qd


def put_back(originals: list) -> None:
    """Copy the saved float weights of :func:`quantize_layer_in_place` back; empties the list."""
    with torch.no_grad():
        for t, saved in originals:
            t.copy_(saved)
    originals.clear()


def _attach_lookahead(spec, wrapper: SparseMLP):
    """Hand the wrapper what lookahead predictors read: the input norm's output, or the
    decoder layer's input where the model has no input norm (as the Recorder records)."""
    if spec.input_norm is not None:
        def after_norm(module, inputs, output):
            wrapper.lookahead_input = output

        return spec.input_norm.register_forward_hook(after_norm)

    def before_layer(module, args, kwargs):
        wrapper.lookahead_input = args[0] if args else kwargs["hidden_states"]

    return spec.layer.register_forward_pre_hook(before_layer, with_kwargs=True)
