"""The byte bound: what no sparse MLP can beat when decoding is memory-bound.

    >>> budget = decode_bytes(model)                  # weight bytes read per decoded token
    >>> budget.f, budget.bound(0.5), budget.bound(0.5, extra_bytes=predictors.bytes)

Single-token decode is memory-bound: each step reads every weight once, so its time is
about ``bytes read / bandwidth``. With ``f`` the share of those bytes in the MLPs and ``d``
the MLP density, no sparse MLP can make decoding faster than ``1 / ((1 - f) + f d)``
(:meth:`DecodeBytes.bound`); a predictor's own weights are read too and lower the bound
further. Bytes read per decoded token are all weights except the embedding table, of which
only one row is read - but the LM head is read whole every token, also when it is tied to
the embedding. (KV cache reads are not weights and are not counted: at the short contexts
benchmarked here they are a fraction of a percent of the weights.)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

# --------------------------------------------------------------------------------------
# the byte bound
# --------------------------------------------------------------------------------------


def byte_bound(f: float, density: float, extra_share: float = 0.0) -> float:
    """Upper bound on the decode speedup of a sparse MLP: ``1 / ((1 - f) + f d + e)``.

        >>> round(byte_bound(0.59, 0.5), 2)
        1.42

    ``f``: MLP share of the weight bytes read per token; ``density``: share of MLP
    neurons computed; ``extra_share``: bytes the sparse model reads on top (e.g. its
    predictors), as a share of the dense model's bytes.
    """
    if not 0.0 <= f <= 1.0:
        raise ValueError(f"f must be in [0, 1], got {f}")
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density must be in [0, 1], got {density}")
    if extra_share < 0:
        raise ValueError(f"extra_share must be >= 0, got {extra_share}")
    return 1.0 / ((1.0 - f) + f * density + extra_share)


@dataclass(frozen=True)
class DecodeBytes:
    """Weight bytes one decoded token reads, split into the MLPs and everything else.

        >>> b = decode_bytes(model); b.f, b.bound(0.3), b.bound(0.3, extra_bytes=p.bytes)

    ``other`` holds attention, norms, the LM head (``lm_head``, counted even when tied)
    and one embedding row (``embedding_row``).
    """

    mlp: int
    other: int
    lm_head: int
    embedding_row: int
    n_layers: int

    @property
    def total(self) -> int:
        return self.mlp + self.other

    @property
    def f(self) -> float:
        """MLP share of the bytes read per token."""
        return self.mlp / self.total

    def bound(self, density: float, extra_bytes: int = 0) -> float:
        """Decode speedup bound at MLP ``density``; ``extra_bytes`` (e.g. predictors) are
        read on the sparse side only."""
        return byte_bound(self.f, density, extra_bytes / self.total)

    def describe(self) -> dict[str, Any]:
        return {"mlp": self.mlp, "other": self.other, "lm_head": self.lm_head,
                "embedding_row": self.embedding_row, "total": self.total, "f": self.f,
                "n_layers": self.n_layers}


def bound_curve(budget: DecodeBytes, densities: Iterable[float] | None = None,
                extra_bytes: int = 0) -> pd.DataFrame:
    """The byte bound against MLP density, without and with ``extra_bytes`` (predictors).

        >>> bound_curve(decode_bytes(model), extra_bytes=predictors.bytes).plot(x="density")

    Columns: density, bound, bound_with_extra.
    """
    d = np.linspace(0.05, 1.0, 20) if densities is None else np.asarray(list(densities), dtype=float)
    return pd.DataFrame({"density": d, "bound": [budget.bound(x) for x in d],
                         "bound_with_extra": [budget.bound(x, extra_bytes) for x in d]})


def _unique_params(module: nn.Module) -> dict[int, nn.Parameter]:
    # tied weights are one Parameter object reachable under two names: count it once
    return {id(p): p for p in module.parameters()}


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def decode_bytes(model: nn.Module) -> DecodeBytes:
    """Bytes of weights a decode step of ``model`` reads, from its actual parameters.

        >>> decode_bytes(model).f          # ~0.59 for SmolLM2-135M
    """
    from sparselab.models import adapter_for

    adapter = adapter_for(model)
    params = _unique_params(model)
    mlp_ids: set[int] = set()
    for spec in adapter.layers:
        mlp_ids |= set(_unique_params(spec.mlp))
    mlp = sum(_nbytes(params[i]) for i in mlp_ids if i in params)
    emb = model.get_input_embeddings().weight
    head_module = model.get_output_embeddings()
    head = head_module.weight if head_module is not None else emb
    tied = head.data_ptr() == emb.data_ptr()
    rest = sum(_nbytes(p) for i, p in params.items() if i not in mlp_ids)
    row = emb.shape[1] * emb.element_size()
    # the table is not read (one row is); a tied head *is* the table and is read whole
    other = rest - _nbytes(emb) + row + (_nbytes(head) if tied else 0)
    return DecodeBytes(mlp=mlp, other=other, lm_head=_nbytes(head), embedding_row=row,
                       n_layers=adapter.n_layers)


def int8_bytes_per_weight(block: int | None, row_length: int) -> float:
    """Bytes read per weight of int8 weights with a float32 scale per ``block`` weights
    (``None``: one per row of ``row_length``): ``int8_bytes_per_weight(32, 576) == 1.125``."""
    return 1.0 + 4.0 / (block or row_length)


def with_int8_mlp(budget: DecodeBytes, row_length: int, block: int | None = None,
                  from_size: int = 4, down_col_scales: bool = False) -> DecodeBytes:
    """``budget`` with its MLP weights stored as int8 plus a float32 scale per ``block``
    weights (``None``: per row of ``row_length``), as ``sl.sparsify(weights=...)`` runs them.

        >>> b8 = with_int8_mlp(decode_bytes(model), row_length=576, block=32)
        >>> b8.mlp / decode_bytes(model).mlp                 # (1 + 4/32) / 4 = 0.28125

    ``from_size``: bytes per weight in ``budget`` (4 for a float32 model). Every MLP row
    (gate and up by neuron, down by neuron as its transpose) has ``row_length`` weights.
    ``down_col_scales``: each layer's down also has a float32 scale per output channel
    (``row_length`` of them), read every token whatever the density, so counted in ``other``.
    """
    if row_length < 1 or (block is not None and (block < 1 or row_length % block)):
        raise ValueError(f"block {block!r} must be None or a positive divisor of the row length "
                         f"{row_length}")
    per_weight = int8_bytes_per_weight(block, row_length)
    col = 4 * row_length * budget.n_layers if down_col_scales else 0
    return replace(budget, mlp=round(budget.mlp / from_size * per_weight), other=budget.other + col)


def decode_bytes_from_config(config, dtype: torch.dtype = torch.float32,
                             num_hidden_layers: int | None = None) -> DecodeBytes:
    """:func:`decode_bytes` from a Llama-style config, without building the model.

        >>> decode_bytes_from_config(LlamaConfig(...), num_hidden_layers=28).bound(0.3)

    Counts q/k/v/o projections (grouped-query: k and v have ``num_key_value_heads``),
    gate/up/down, two norms per layer, the final norm, the LM head and one embedding row;
    biases when ``attention_bias`` / ``mlp_bias`` say so.
    """
    c = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden, inter = int(c.hidden_size), int(c.intermediate_size)
    layers = int(num_hidden_layers if num_hidden_layers is not None else c.num_hidden_layers)
    heads = int(c.num_attention_heads)
    kv = int(getattr(c, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(c, "head_dim", None) or hidden // heads)
    vocab = int(c.vocab_size)
    size = torch.empty((), dtype=dtype).element_size()
    q, k = heads * head_dim, kv * head_dim
    attn = hidden * q + 2 * hidden * k + q * hidden
    if getattr(c, "attention_bias", False):
        attn += q + 2 * k + hidden
    mlp = 3 * hidden * inter + ((2 * inter + hidden) if getattr(c, "mlp_bias", False) else 0)
    other = layers * (attn + 2 * hidden) + hidden + vocab * hidden + hidden
    return DecodeBytes(mlp=layers * mlp * size, other=other * size, lm_head=vocab * hidden * size,
                       embedding_row=hidden * size, n_layers=layers)
