"""The down projection rewritten in place as ``down_t`` ``[I, H]`` row-major (what the
kernels read: a neuron's down column becomes a contiguous row), and back, bit for bit.

    >>> down_t = transpose_in_place(mlp.down_proj.weight)      # the parameter is a view now
    >>> untranspose_in_place(mlp.down_proj.weight, down_t)     # the original layout again

Writing into the same memory, rather than allocating a new ``down_t``, matters: weights
loaded from safetensors live in a private file mapping whose pages stay resident when the
tensor is dropped, so a fresh copy would add the whole down matrix to the process's RSS.
Only one layer's ``[I, H]`` scratch is ever transient (pass the same ``scratch`` list for
every layer).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["transpose_in_place", "untranspose_in_place"]


def _scratch_for(weight: torch.Tensor, scratch: list) -> torch.Tensor:
    """One reusable buffer of ``weight``'s size: a fresh transient per layer would leave the
    allocator holding ~one down matrix per layer of freed-but-resident memory."""
    if not scratch or scratch[0].numel() < weight.numel() or scratch[0].dtype != weight.dtype:
        scratch[:] = [torch.empty(weight.numel(), dtype=weight.dtype)]
    return scratch[0][: weight.numel()]


def transpose_in_place(weight: nn.Parameter, scratch: list | None = None) -> torch.Tensor:
    """Rewrite ``weight`` [H, I] as ``down_t`` [I, H] row-major *in its own memory*; the
    parameter then holds the transposed view ``down_t.t()`` (same values, so dense calls
    still work). Returns ``down_t``."""
    w = weight.data
    hidden, n = w.shape
    tmp = _scratch_for(w, [] if scratch is None else scratch).view(n, hidden)
    tmp.copy_(w.t())
    down_t = torch.as_strided(w, (n, hidden), (hidden, 1))
    down_t.copy_(tmp)
    weight.data = down_t.t()
    return down_t


def untranspose_in_place(weight: nn.Parameter, down_t: torch.Tensor,
                         scratch: list | None = None) -> None:
    """Inverse of :func:`transpose_in_place`: the original contiguous [H, I] layout and
    values (bit for bit), in the same memory."""
    n, hidden = down_t.shape
    tmp = _scratch_for(down_t, [] if scratch is None else scratch).view(hidden, n)
    tmp.copy_(down_t.t())
    w = torch.as_strided(down_t, (hidden, n), (n, 1))
    w.copy_(tmp)
    weight.data = w
