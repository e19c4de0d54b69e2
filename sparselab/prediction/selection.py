"""Selection methods: one protocol for every way of choosing what a sparse MLP reads.

    >>> method = sl.prediction.methods.Shadow(density=0.45).fit(model, train_trace)
    >>> with sl.sparsify(model, method=method, prefill="per_token") as handle:
    ...     model(**batch)
    >>> handle.bytes_share()             # MLP weight bytes read per token / dense MLP bytes

A gated MLP ``down(act(gate x) * (up x))`` reads, per token, some rows of ``gate`` and
``up`` (neurons), possibly over only some columns (input channels of ``x``), and some
columns of ``down`` (neurons again). A :class:`SelectionMethod` says which, per token, in a
:class:`Selection`; the library then computes the MLP over exactly those weights
(:func:`run_selection`) and counts the bytes they are (:func:`selection_bytes`), adding
the bytes of the method's own weights (a predictor, a quantized copy). So every method -
oracle, trained predictors, input-magnitude thresholds, quantized shadows - is judged
by one measure, quality against bytes read, and the bytes are never counted by hand.

A method may look at the layer's weights and at anything it computes itself (e.g. the
exact ``h`` of the rows it reads, to pick the down rows from it: "two-stage"); it must
declare every weight it reads. :class:`~sparselab.prediction.MaskPredictor` s plug in
through :class:`sparselab.prediction.methods.Predicted`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F

__all__ = ["MLPWeights", "Selection", "SelectionMethod", "dense_mlp_bytes", "run_selection",
           "selected_h", "selection_bytes", "top_share"]


@dataclass(frozen=True)
class MLPWeights:
    """One layer's gated MLP as a method sees it: ``gate``/``up`` ``[N, H]``, ``down``
    ``[H, N]`` (the model's own tensors, not copies) and the activation function."""

    layer: int
    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    act: Callable[[torch.Tensor], torch.Tensor]

    @property
    def n_neurons(self) -> int:
        return self.gate.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.gate.shape[1]

    @property
    def itemsize(self) -> int:
        return self.gate.element_size()

    def h(self, x: torch.Tensor) -> torch.Tensor:
        """Exact ``act(gate x) * (up x)`` for rows ``x`` ``[T, H]``."""
        return self.act(F.linear(x, self.gate)) * F.linear(x, self.up)


@dataclass(frozen=True)
class Selection:
    """What one layer reads for each of ``T`` tokens (None = everything).

    - ``gate_rows``, ``up_rows``: bool ``[T, N]``, the neurons whose gate / up rows are read;
    - ``inputs``: bool ``[T, H]``, the input channels gate and up read (their columns);
    - ``down_rows``: bool ``[T, N]``, the neurons whose column of ``down`` is read. Only
      neurons whose gate and up rows are both read have an ``h``; others contribute 0.
    - ``extra_bytes``: bytes per token the method reads beyond these (its own weights).
    """

    gate_rows: torch.Tensor | None = None
    up_rows: torch.Tensor | None = None
    down_rows: torch.Tensor | None = None
    inputs: torch.Tensor | None = None
    extra_bytes: int = 0

    def neurons(self) -> torch.Tensor | None:
        """Bool ``[T, N]`` of the neurons that reach ``down`` (None = all)."""
        out = None
        for m in (self.gate_rows, self.up_rows, self.down_rows):
            if m is not None:
                out = m if out is None else out & m
        return out


def _count(mask: torch.Tensor | None, full: int, n_tokens: int) -> torch.Tensor:
    if mask is None:
        return torch.full((n_tokens,), float(full), dtype=torch.float64)
    return mask.sum(-1).to(torch.float64)


def selection_bytes(selection: Selection, weights: MLPWeights, n_tokens: int) -> torch.Tensor:
    """Weight bytes read per token, float64 ``[T]``: gate rows x input columns + up rows x
    input columns + down columns of neurons that have an ``h`` x H, + the extra bytes.

        >>> selection_bytes(Selection(), w, 1) / dense_mlp_bytes(w)     # dense: 1.0
    """
    n, hidden, size = weights.n_neurons, weights.hidden_size, weights.itemsize
    cols = _count(selection.inputs, hidden, n_tokens)
    gate = _count(selection.gate_rows, n, n_tokens)
    up = _count(selection.up_rows, n, n_tokens)
    down = _count(selection.neurons(), n, n_tokens)
    return size * (cols * (gate + up) + down * hidden) + float(selection.extra_bytes)


def dense_mlp_bytes(weights: MLPWeights) -> int:
    """Bytes of the dense MLP's three weight matrices."""
    return 3 * weights.n_neurons * weights.hidden_size * weights.itemsize


def run_selection(x: torch.Tensor, weights: MLPWeights, selection: Selection) -> torch.Tensor:
    """The MLP output ``[T, H]`` computed from exactly the weights ``selection`` reads.

    Computed in torch by masking (the result of a kernel that reads only those weights,
    not its speed): inputs outside ``inputs`` are zeroed, ``h`` is zero wherever gate, up
    or down is not read. With an empty selection (all None) this is the dense MLP.
    """
    return F.linear(selected_h(x, weights, selection)[0], weights.down)


def selected_h(x: torch.Tensor, weights: MLPWeights, selection: Selection
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(h, act(gate), neurons)`` as :func:`run_selection` computes them, before ``down``.

        >>> h, a, keep = selected_h(x, w, selection)     # F.linear(h, w.down) == run_selection(...)

    ``h`` ``[T, N]`` is zero outside ``neurons`` (bool ``[T, N]``, or None = all); ``a`` is
    act(gate) of the (input-masked) rows, not masked (what the sparse MLP hands to a
    :class:`~sparselab.Recorder`).
    """
    xin = x if selection.inputs is None else x * selection.inputs.to(x.dtype)
    a = weights.act(F.linear(xin, weights.gate))
    h = a * F.linear(xin, weights.up)
    keep = selection.neurons()
    if keep is not None:
        h = h * keep.to(h.dtype)
    return h, a, keep


def top_share(scores: torch.Tensor, share: float) -> torch.Tensor:
    """Bool mask of each row's ``round(share * n)`` largest ``scores``."""
    from sparselab.masking.thresholds import top_count, top_k_mask

    return top_k_mask(scores, top_count(share, scores.shape[-1]))


@runtime_checkable
class SelectionMethod(Protocol):
    """Chooses, per token and layer, what a sparse MLP reads (see module docstring).

    - ``name``: the method ("oracle", "shadow", "teal", ...); ``point``: its operating
      point as a short label ("0.5", "x0.7/h0.5"); ``realizable``: False for methods that
      need the answer to choose (the oracle);
    - ``fitted``: whether :meth:`fit` has run (or is not needed);
    - ``fit(model, trace)``: a fitted copy (thresholds, quantized copies), from a trace of
      *training* text recorded with ``mlp_in``, ``gate`` and ``h``;
    - ``select(x, weights)``: the :class:`Selection` for rows ``x`` ``[T, H]``;
    - ``describe()``: JSON-able description kept with results.
    """

    name: str
    point: str
    realizable: bool

    @property
    def fitted(self) -> bool: ...

    def fit(self, model, trace) -> SelectionMethod: ...

    def select(self, x: torch.Tensor, weights: MLPWeights) -> Selection: ...

    def describe(self) -> dict[str, Any]: ...
