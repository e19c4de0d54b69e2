"""A recording of what the MLPs did, per token and layer, and how to save it.

    >>> trace = sl.record(model, tokenizer, texts[:8], max_length=128)
    >>> trace.activations(3).shape              # [tokens, neurons] of act(gate) * up
    >>> masks = trace.masks(sl.rules.Calibrated(density=0.5))
    >>> trace.save("smollm2.trace"); sl.Trace.load("smollm2.trace")

Arrays kept per layer (each optional, see :class:`sparselab.Recorder`):

- ``h``        act(gate(x)) * up(x), ``[tokens, neurons]`` (fp16 by default)
- ``gate``     act(gate(x)),         ``[tokens, neurons]``
- ``mlp_in``   x, the MLP's post-norm input, ``[tokens, hidden]``
- ``layer_in`` the decoder layer's input-norm output (before attention), ``[tokens, hidden]``

A recording of a sparsified model (``sl.sparsify``) also holds ``computed``: per layer and
token, the neurons the sparse MLP computed (whose ``h`` reached its down projection), as
packed bits (int64 words ``[layers, tokens, ceil(neurons / 64)]``, the layout of
:class:`sparselab.Masks`); ``h`` and ``gate`` are 0 outside it, and ``meta["sparse"]``
holds the sparsify options (mode, density, prefill, rule or method, sparsified layers):

    >>> with sl.sparsify(model, predictors) as handle, sl.Recorder(model) as rec:
    ...     model.generate(**batch, max_new_tokens=16)
    >>> rec.trace.computed(3)                   # bool [tokens, neurons]
    >>> sl.metrics.churn(rec.trace.computed_masks())   # the metrics of any Masks

A dense recording has no ``computed`` array: every neuron was computed, and
``trace.computed(layer)`` is all True.

Tokens are ordered by sequence, then position; ``is_prefill`` and ``step`` mark which
forward pass of ``model.generate`` produced each token. Files: :mod:`.trace_file`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

ARRAYS = ("h", "gate", "mlp_in", "layer_in")
COMPUTED = "computed"  # packed bits of the neurons a sparse model computed (not a store= choice)
TOKEN_FIELDS = ("token_ids", "seq_ids", "positions", "steps", "is_prefill")

__all__ = ["ARRAYS", "COMPUTED", "TOKEN_FIELDS", "Trace"]


@dataclass
class Trace:
    """Per-token, per-layer MLP recordings of a model (see module docstring)."""

    layers: tuple[int, ...]
    arrays: dict[str, torch.Tensor]  # name -> [layers, tokens, features]
    token_ids: np.ndarray
    seq_ids: np.ndarray
    positions: np.ndarray
    steps: np.ndarray
    is_prefill: np.ndarray
    pieces: list[str] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.layers = tuple(int(x) for x in self.layers)
        n = len(self.token_ids)
        for name in TOKEN_FIELDS:
            arr = np.asarray(getattr(self, name))
            arr = arr.astype(bool if name == "is_prefill" else np.int64, copy=False)
            if arr.shape != (n,):
                raise ValueError(f"{name} has shape {arr.shape}, expected ({n},)")
            setattr(self, name, arr)
        for name, tensor in self.arrays.items():
            if name not in (*ARRAYS, COMPUTED):
                raise ValueError(f"unknown array {name!r}; known: {(*ARRAYS, COMPUTED)}")
            if tensor.ndim != 3 or tensor.shape[0] != len(self.layers) or tensor.shape[1] != n:
                raise ValueError(
                    f"array {name!r} has shape {tuple(tensor.shape)}, expected "
                    f"[{len(self.layers)} layers, {n} tokens, features]"
                )
        if COMPUTED in self.arrays:
            from sparselab._fast.masks import n_words

            bits = self.arrays[COMPUTED]
            if bits.dtype != torch.int64:
                raise ValueError(f"array 'computed' holds packed bits as int64, got {bits.dtype}")
            if not self.n_neurons or bits.shape[2] != n_words(self.n_neurons):
                raise ValueError(f"array 'computed' has {bits.shape[2]} words per token; "
                                 f"{self.n_neurons} neurons need {n_words(self.n_neurons)}")
        if self.pieces is not None and len(self.pieces) != n:
            raise ValueError(f"{len(self.pieces)} text pieces for {n} tokens")

    # -- sizes --------------------------------------------------------------------------
    @property
    def n_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def n_neurons(self) -> int:
        for name in ("h", "gate"):
            if name in self.arrays:
                return int(self.arrays[name].shape[2])
        return int(self.meta.get("intermediate_size", 0))

    @property
    def hidden_size(self) -> int:
        for name in ("mlp_in", "layer_in"):
            if name in self.arrays:
                return int(self.arrays[name].shape[2])
        return int(self.meta.get("hidden_size", 0))

    @property
    def n_sequences(self) -> int:
        return int(len(np.unique(self.seq_ids)))

    def layer_index(self, layer: int) -> int:
        try:
            return self.layers.index(int(layer))
        except ValueError:
            raise KeyError(f"layer {layer} was not recorded (layers: {list(self.layers)})") from None

    # -- arrays -------------------------------------------------------------------------
    def values(self, name: str, layer: int) -> torch.Tensor:
        """Any recorded array of one layer as float32 ``[tokens, features]``: ``"h"``,
        ``"gate"``, ``"mlp_in"`` or ``"layer_in"`` (what rules read as their source)."""
        if name == COMPUTED:
            raise KeyError("'computed' holds packed bits: read it with trace.computed(layer)")
        if name not in self.arrays:
            raise KeyError(
                f"{name!r} was not recorded (recorded: {sorted(self.arrays)}); pass "
                f"store=(..., {name!r}) to the Recorder"
            )
        return self.arrays[name][self.layer_index(layer)].float()

    def activations(self, layer: int) -> torch.Tensor:
        """``h = act(gate(x)) * up(x)`` of one layer, float32 ``[tokens, neurons]``."""
        return self.values("h", layer)

    def gate_activations(self, layer: int) -> torch.Tensor:
        """``act(gate(x))`` of one layer, float32 ``[tokens, neurons]``."""
        return self.values("gate", layer)

    def mlp_inputs(self, layer: int) -> torch.Tensor:
        """The MLP's post-norm input of one layer, float32 ``[tokens, hidden]``."""
        return self.values("mlp_in", layer)

    def layer_inputs(self, layer: int) -> torch.Tensor:
        """The decoder layer's input-norm output (before attention), ``[tokens, hidden]``."""
        return self.values("layer_in", layer)

    # -- what a sparse model computed ------------------------------------------------------
    @property
    def sparse(self) -> dict[str, Any] | None:
        """The sparsify options of a recording of a sparse model (``meta["sparse"]``), else None.

            >>> trace.sparse["mode"], trace.sparse["density"]      # e.g. ("predicted", 0.5)
        """
        return self.meta.get("sparse") if COMPUTED in self.arrays else None

    def computed(self, layer: int) -> torch.Tensor:
        """Bool ``[tokens, neurons]``: the neurons the MLP of ``layer`` computed per token.

            >>> trace.computed(3).float().mean(1)     # density each token really ran at

        All True for a dense recording (no ``computed`` array: every neuron ran).
        """
        from sparselab._fast.masks import unpack

        index = self.layer_index(layer)
        if COMPUTED not in self.arrays:
            if not self.n_neurons:
                raise KeyError("this trace records neither h, gate nor its neuron count")
            return torch.ones(self.n_tokens, self.n_neurons, dtype=torch.bool)
        words = self.arrays[COMPUTED][index].numpy().view(np.uint64)
        return torch.from_numpy(unpack(words, self.n_neurons))

    def computed_masks(self):
        """The computed neurons of every layer as :class:`sparselab.Masks` (for the metrics).

            >>> sl.metrics.density(trace.computed_masks())    # what the sparse model ran

        All True for a dense recording.
        """
        from sparselab._fast.masks import n_words
        from sparselab.masking.masks import Masks

        rule = {"name": "computed", "sparse": self.meta.get("sparse")}
        if COMPUTED in self.arrays:
            bits = self.arrays[COMPUTED]
            bits = bits.load() if hasattr(bits, "load") else bits
            bits = bits.numpy().view(np.uint64)
        else:
            from sparselab._fast.masks import pack

            full = pack(np.ones((1, self.n_neurons), dtype=bool))
            bits = np.broadcast_to(full, (self.n_layers, self.n_tokens, n_words(self.n_neurons)))
        return Masks(bits=bits, n_neurons=self.n_neurons, layers=self.layers,
                     seq_ids=self.seq_ids, positions=self.positions, rule=rule)

    def masks(self, rule):
        """Binary masks of every token and layer under a rule of :mod:`sparselab.masking.rules`."""
        from sparselab.masking.rules import apply_rule

        return apply_rule(rule, self)

    # -- selection ----------------------------------------------------------------------
    def select_tokens(self, index) -> Trace:
        """A new trace holding only the given tokens (bool mask or int index)."""
        index = np.asarray(index)
        if index.dtype == bool:
            index = np.flatnonzero(index)
        idx_t = torch.as_tensor(index, dtype=torch.long)
        return Trace(
            layers=self.layers,
            arrays={k: v.index_select(1, idx_t) for k, v in self.arrays.items()},
            token_ids=self.token_ids[index],
            seq_ids=self.seq_ids[index],
            positions=self.positions[index],
            steps=self.steps[index],
            is_prefill=self.is_prefill[index],
            pieces=None if self.pieces is None else [self.pieces[i] for i in index],
            meta=dict(self.meta),
        )

    def select_sequences(self, seq_ids) -> Trace:
        """A new trace holding only the tokens of the given sequence ids."""
        return self.select_tokens(np.isin(self.seq_ids, np.asarray(list(seq_ids))))

    def to_frame(self) -> pd.DataFrame:
        """Tidy per-token metadata: token, text piece, sequence, position, step, prefill."""
        return pd.DataFrame(
            {
                "token": np.arange(self.n_tokens),
                "token_id": self.token_ids,
                "piece": self.pieces if self.pieces is not None else self.token_ids.astype(str),
                "seq_id": self.seq_ids,
                "position": self.positions,
                "step": self.steps,
                "is_prefill": self.is_prefill,
            }
        )

    def __repr__(self) -> str:
        return (
            f"Trace(model={self.meta.get('model', {}).get('name')!r}, tokens={self.n_tokens}, "
            f"sequences={self.n_sequences}, layers={self.n_layers}, neurons={self.n_neurons}, "
            f"arrays={sorted(self.arrays)})"
        )

    # -- persistence --------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write the trace to one safetensors file, atomically (see :mod:`.trace_file`), or
        to a Zarr store when ``path`` ends in ``.zarr`` (see :mod:`.zarr_store`)."""
        from sparselab.recording.trace_file import save_trace
        from sparselab.recording.zarr_store import is_zarr_path, write_zarr

        return write_zarr(self, path) if is_zarr_path(path) else save_trace(self, path)

    @classmethod
    def open(cls, path: str | os.PathLike) -> Trace:
        """A Zarr store written by ``record(..., out=path)`` as a lazy trace (same API).

            >>> trace = sl.Trace.open("run.zarr"); trace.activations(3)
        """
        from sparselab.recording.zarr_store import open_trace

        return open_trace(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Trace:
        """Read a file written by :meth:`save`; clear errors for truncated or foreign files."""
        from sparselab.recording.trace_file import load_trace

        return load_trace(path)
