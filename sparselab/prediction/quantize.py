"""Group-wise symmetric integer quantization of weight rows (for shadow predictors).

    >>> q, scale = quantize_groups(w, bits=4, group=64)     # int8 codes, fp16 scales
    >>> w4 = dequantize_groups(q, scale, group=64)           # float32, w's shape
    >>> quantized_bytes(w.shape, bits=4, group=64)           # what reading it costs

Each row is cut into groups of ``group`` consecutive weights; a group's scale is its
largest magnitude over ``2**(bits-1) - 1`` (stored as float16, and the codes are rounded
against the stored scale so dequantizing is exact to it); codes are
``clamp(round(w / scale), -2**(bits-1), 2**(bits-1) - 1)``.
"""

from __future__ import annotations

import torch

__all__ = ["dequantize_groups", "quantize_groups", "quantized_bytes"]


def _check(shape: tuple[int, ...], bits: int, group: int) -> None:
    if not 2 <= int(bits) <= 8:
        raise ValueError(f"bits must be in [2, 8], got {bits}")
    if group < 1 or len(shape) != 2 or shape[1] % group:
        raise ValueError(f"group must divide the row length: rows of {shape[-1]}, group {group}")


def quantize_groups(w: torch.Tensor, bits: int = 4, group: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes int8 [N, H], scales float16 [N, H // group])`` of a 2-D weight ``w``."""
    _check(tuple(w.shape), bits, group)
    n, h = w.shape
    top = 2 ** (bits - 1) - 1
    g = w.detach().to(torch.float32).reshape(n, h // group, group)
    scale = (g.abs().amax(-1) / top).to(torch.float16)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale)).to(torch.float32)
    codes = torch.clamp(torch.round(g / safe[..., None]), -top - 1, top).to(torch.int8)
    return codes.reshape(n, h), scale


def dequantize_groups(codes: torch.Tensor, scale: torch.Tensor, group: int = 64) -> torch.Tensor:
    """The float32 weight the codes stand for."""
    n, h = codes.shape
    g = codes.to(torch.float32).reshape(n, h // group, group)
    return (g * scale.to(torch.float32)[..., None]).reshape(n, h)


def quantized_bytes(shape: tuple[int, ...], bits: int = 4, group: int = 64) -> int:
    """Bytes of a quantized ``[N, H]`` weight: ``bits`` per weight plus a 2-byte scale per group."""
    shape = tuple(int(s) for s in shape)
    _check(shape, bits, group)
    n, h = shape
    return (n * h * bits + 7) // 8 + 2 * n * (h // group)
