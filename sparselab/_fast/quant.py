"""8-bit weights for the sparse kernels: symmetric int8 with float32 scales per row or
per block of 32 weights.

    >>> q = quantize_int8(mlp.gate_proj.weight, block=32)  # Int8Blocks: q int8, scale [I, H/32]
    >>> q = quantize_int8(mlp.gate_proj.weight)          # Int8Rows: q int8 [I, H], scale [I]
    >>> w = q.dequantize()                               # float32, what the kernels compute with
    >>> save_int8("layer.safetensors", {"gate": q}); load_int8("layer.safetensors")["gate"]

``w[i, k] ~ scale[i] * q[i, k]`` with ``scale[i] = max_k |w[i, k]| / 127`` (round to
nearest, ties to even). A row is one neuron (gate/up rows; a ``down_t`` row is one
column of ``down_proj``), so the kernels fold the scale into one multiply per neuron and
read 1 byte per weight. ``quantize_int8(w, block=32)`` gives per-block-of-32 scales
(:class:`Int8Blocks`, like GGUF's Q8_0: 1.125 bytes per weight with float32 scales); the
kernels take both (blocks of 32, 64, 128 or 256). On SmolLM2-135M, dense, against fp32
(experiments/results/quality_int8x.md) per-row scales cost +3.6 % perplexity, blocks of 32
+0.7 %, blocks of 64 +0.0 % (KL 0.0044 against 0.0025 for 32): blocks of 32 are
``sl.sparsify(weights="int8")``, of 64 ``weights="int8_b64"``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = ["Int8Blocks", "Int8Rows", "load_int8", "quantize_int8", "round_x_int8", "save_int8"]


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

    def scales2d(self) -> torch.Tensor:
        """Scales as ``[I, n_blocks]`` (one block per row here)."""
        return self.scale[:, None]

    def t(self) -> Int8Rows:
        """Requantized transpose (for ``down_t`` from ``down_proj``): rounds again."""
        return quantize_int8(self.dequantize().t().contiguous())


@dataclass(frozen=True)
class Int8Blocks:
    """int8 weights ``q [I, H]`` with float32 scales per block of ``block`` weights of a row."""

    q: torch.Tensor
    scale: torch.Tensor
    block: int

    def __post_init__(self):
        if not isinstance(self.q, torch.Tensor) or self.q.dtype != torch.int8 or self.q.dim() != 2:
            raise ValueError("Int8Blocks.q must be a 2-D torch.int8 tensor")
        if isinstance(self.block, bool) or not isinstance(self.block, int) or self.block < 1 \
                or self.q.shape[1] % self.block:
            raise ValueError(f"Int8Blocks.block must divide the row length {self.q.shape[1]}")
        want = (self.q.shape[0], self.q.shape[1] // self.block)
        if not isinstance(self.scale, torch.Tensor) or self.scale.dtype != torch.float32 \
                or tuple(self.scale.shape) != want:
            raise ValueError(f"Int8Blocks.scale must be float32 {list(want)}")

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    def scales2d(self) -> torch.Tensor:
        return self.scale

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


def round_x_int8(x: torch.Tensor, group: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """x as the int8-x kernels read it: rounded to int8 per group of ``group`` channels.

        >>> xq, sx = round_x_int8(x)             # x [..., H] float
        >>> x_seen = xq.float() * sx.repeat_interleave(64, -1)[..., :H]

    ``sx = max |x| / 127`` per group (the last group may be short), ``xq = round(x / sx)``
    (half to even, clamped to +-127; a group of zeros gives 0), in float32 exactly as
    ``csrc/sl_qdot.h`` computes them. Returns (int8 ``xq`` like ``x``, float32 ``sx``
    ``[..., ceil(H / group)]``).
    """
    x = x.detach().to(torch.float32)
    h = x.shape[-1]
    ng = -(-h // group)
    pad = torch.nn.functional.pad(x, (0, ng * group - h)).reshape(*x.shape[:-1], ng, group)
    sx = pad.abs().amax(-1) / 127.0
    inv = torch.where(sx > 0, 1.0 / torch.where(sx > 0, sx, torch.ones_like(sx)),
                      torch.zeros_like(sx))
    xq = torch.round(pad * inv[..., None]).clamp_(-127, 127)
    return xq.reshape(*x.shape[:-1], ng * group)[..., :h].to(torch.int8), sx


def save_int8(path, weights: dict, metadata: dict[str, str] | None = None) -> None:
    """Store named :class:`Int8Rows` / :class:`Int8Blocks` in a safetensors file
    (``name.q``, ``name.scale``: ``[I]`` per row, ``[I, H / block]`` per block)."""
    from safetensors.torch import save_file

    tensors = {}
    for name, w in weights.items():
        if not isinstance(w, (Int8Rows, Int8Blocks)):
            raise ValueError(f"{name}: expected Int8Rows or Int8Blocks, got {type(w).__name__}")
        tensors[f"{name}.q"] = w.q.contiguous()
        tensors[f"{name}.scale"] = w.scale.contiguous()
    meta = {"format": "sparselab-int8-rows", **(metadata or {})}
    save_file(tensors, str(Path(path)), metadata=meta)


def load_int8(path) -> dict:
    """Read what :func:`save_int8` wrote."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        if (f.metadata() or {}).get("format") != "sparselab-int8-rows":
            raise ValueError(f"{path} is not a sparselab int8 file")
    t = load_file(str(path))
    names = sorted({k.rsplit(".", 1)[0] for k in t})
    out = {}
    for n in names:
        q, sc = t[f"{n}.q"], t[f"{n}.scale"]
        out[n] = Int8Rows(q, sc) if sc.dim() == 1 else Int8Blocks(q, sc, q.shape[1] // sc.shape[1])
    return out


# the block sizes the kernels run (a multiple of 32 that divides their 256-weight passes);
# Int8Blocks of any other size are for study
KERNEL_BLOCKS = (32, 64, 128, 256)


def stacked_scales(gate, up, down_t) -> np.ndarray:
    """The kernels' ``[I, 3, n_blocks]`` float32 scales of one layer's int8 weights;
    ValueError unless all three share one format the kernels run."""

    kinds = {(type(w), getattr(w, "block", None)) for w in (gate, up, down_t)}
    if len(kinds) != 1:
        raise ValueError("gate, up and down_t must share one int8 format (all per-row or all "
                         "per-block with the same block)")
    if isinstance(gate, Int8Blocks) and gate.block not in KERNEL_BLOCKS:
        raise ValueError(f"the kernels take int8 blocks of {KERNEL_BLOCKS}, got {gate.block}")
    return np.ascontiguousarray(np.stack(
        [gate.scales2d().numpy(), up.scales2d().numpy(), down_t.scales2d().numpy()], 1))
