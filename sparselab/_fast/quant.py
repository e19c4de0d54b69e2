"""8-bit weights for the sparse kernels: symmetric int8 with one float32 scale per row.

    >>> q = quantize_int8(mlp.gate_proj.weight)          # Int8Rows: q int8 [I, H], scale [I]
    >>> w = q.dequantize()                               # float32, what the kernels compute with
    >>> save_int8("layer.safetensors", {"gate": q}); load_int8("layer.safetensors")["gate"]

``w[i, k] ~ scale[i] * q[i, k]`` with ``scale[i] = max_k |w[i, k]| / 127`` (round to
nearest, ties to even). A row is one neuron (gate/up rows; a ``down_t`` row is one
column of ``down_proj``), so the kernels fold the scale into one multiply per neuron and
read 1 byte per weight. ``quantize_int8(w, block=32)`` gives per-block-of-32 scales
(:class:`Int8Blocks`, like GGUF's Q8_0) for comparing quality; the kernels take per-row
scales only (per-block scales would add 4 bytes per 32 weights and a multiply per block;
see experiments/results/bench_kernels.md for the quality of both).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["Int8Blocks", "Int8Rows", "load_int8", "quantize_int8", "save_int8"]


@dataclass(frozen=True)
class Int8Rows:
    """int8 weights ``q [I, H]`` with float32 per-row scales ``scale [I]``."""

    q: torch.Tensor
    scale: torch.Tensor

    def __post_init__(self):
        if not isinstance(self.q, torch.Tensor) or self.q.dtype != torch.int8 or self.q.dim() != 2:
            raise ValueError("Int8Rows.q must be a 2-D torch.int8 tensor")
        if not isinstance(self.scale, torch.Tensor) or self.scale.dtype != torch.float32 \
                or tuple(self.scale.shape) != (self.q.shape[0],):
            raise ValueError(f"Int8Rows.scale must be float32 [{self.q.shape[0]}], got "
                             f"{getattr(self.scale, 'dtype', type(self.scale))} "
                             f"{tuple(getattr(self.scale, 'shape', ()))}")

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    def dequantize(self) -> torch.Tensor:
        return self.q.to(torch.float32) * self.scale[:, None]

    def t(self) -> Int8Rows:
        """Requantized transpose (for ``down_t`` from ``down_proj``): rounds again."""
        return quantize_int8(self.dequantize().t().contiguous())


@dataclass(frozen=True)
class Int8Blocks:
    """int8 weights ``q [I, H]`` with float32 scales per block of ``block`` weights of a row."""

    q: torch.Tensor
    scale: torch.Tensor
    block: int

    def dequantize(self) -> torch.Tensor:
        i, h = self.q.shape
        return (self.q.to(torch.float32).reshape(i, h // self.block, self.block)
                * self.scale[:, :, None]).reshape(i, h)


def _absmax_quant(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize along the last dimension: (int8 q, float32 scale of shape w.shape[:-1])."""
    amax = w.abs().amax(dim=-1)
    scale = amax / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / safe[..., None]).clamp_(-127, 127).to(torch.int8)
    return q, scale.to(torch.float32).contiguous()


def quantize_int8(w, block: int | None = None):
    """Symmetric int8 quantization of a 2-D float weight (any float dtype).

        >>> q = quantize_int8(gate_proj.weight)              # per-row scales (kernel format)
        >>> qb = quantize_int8(gate_proj.weight, block=32)   # per-block scales (quality study)

    ValueError for non-2-D, non-float, non-finite weights, or a row length that is not a
    multiple of ``block``.
    """
    if not isinstance(w, torch.Tensor) or not w.is_floating_point():
        raise ValueError(f"w must be a floating-point torch tensor, got "
                         f"{getattr(w, 'dtype', type(w).__name__)}")
    if w.dim() != 2 or w.numel() == 0:
        raise ValueError(f"w must be a non-empty 2-D weight, got shape {tuple(w.shape)}")
    w = w.detach().to(torch.float32)
    if not torch.isfinite(w).all():
        raise ValueError("w has non-finite values")
    if block is None:
        q, scale = _absmax_quant(w)
        return Int8Rows(q.contiguous(), scale)
    if isinstance(block, bool) or not isinstance(block, int) or block < 1 or w.shape[1] % block:
        raise ValueError(f"block must be a positive int dividing the row length {w.shape[1]}, "
                         f"got {block!r}")
    i, h = w.shape
    q, scale = _absmax_quant(w.reshape(i, h // block, block))
    return Int8Blocks(q.reshape(i, h).contiguous(), scale, block)


def save_int8(path, weights: dict[str, Int8Rows], metadata: dict[str, str] | None = None) -> None:
    """Store named :class:`Int8Rows` in a safetensors file (``name.q``, ``name.scale``)."""
    from safetensors.torch import save_file

    tensors = {}
    for name, w in weights.items():
        if not isinstance(w, Int8Rows):
            raise ValueError(f"{name}: expected Int8Rows, got {type(w).__name__}")
        tensors[f"{name}.q"] = w.q.contiguous()
        tensors[f"{name}.scale"] = w.scale.contiguous()
    meta = {"format": "sparselab-int8-rows", **(metadata or {})}
    save_file(tensors, str(Path(path)), metadata=meta)


def load_int8(path) -> dict[str, Int8Rows]:
    """Read what :func:`save_int8` wrote."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        if (f.metadata() or {}).get("format") != "sparselab-int8-rows":
            raise ValueError(f"{path} is not a sparselab int8 file")
    t = load_file(str(path))
    names = sorted({k.rsplit(".", 1)[0] for k in t})
    return {n: Int8Rows(t[f"{n}.q"], t[f"{n}.scale"]) for n in names}
