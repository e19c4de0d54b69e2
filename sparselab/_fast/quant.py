"""8-bit weights for the sparse kernels: symmetric int8 with float32 scales per row (and,
optionally, per column) or per block of weights.

    >>> q = quantize_int8(mlp.gate_proj.weight, block=32)  # Int8Blocks: q int8, scale [I, H/32]
    >>> q = quantize_int8(mlp.gate_proj.weight)          # Int8Rows: q int8 [I, H], scale [I]
    >>> qd = quantize_int8(down_t, col_scales=True)      # Int8Rows with col_scale [H] too
    >>> w = q.dequantize()                               # float32, what the kernels compute with
    >>> save_int8("layer.safetensors", {"gate": q}); load_int8("layer.safetensors")["gate"]

``w[i, k] ~ scale[i] * q[i, k]`` with ``scale[i] = max_k |w[i, k]| / 127`` (round to
nearest, ties to even). A row is one neuron (gate/up rows; a ``down_t`` row is one
column of ``down_proj``), so the kernels fold the scale into one multiply per neuron and
read 1 byte per weight. ``quantize_int8(w, block=32)`` gives per-block-of-32 scales
(:class:`Int8Blocks`, like GGUF's Q8_0: 1.125 bytes per weight with float32 scales); the
kernels take both (blocks of 32, 64, 128 or 256). ``col_scales=True`` adds a scale per
column (``w[i, k] ~ scale[i] * col_scale[k] * q[i, k]``); on ``down_t`` a column is an
output channel, so the kernels multiply the column scales into ``y`` once after the down
pass and still read 1 byte per weight.

On SmolLM2-135M, dense, against fp32 (experiments/results/quality_int8x.md): per-row scales
cost +3.6 % perplexity (KL 0.032), blocks of 32 +0.7 % (KL 0.0025), blocks of 64 +0.0 %
(KL 0.0044), per-row with down's output-channel scales -0.2 % (KL 0.0017). Per-row scales
lose to a few output channels of down whose weights are all large (the residual stream's
massive channels): one such column sets every row's step. Giving down's columns their own
scale fixes that; column scales on gate and up measured no better. The :data:`INT8_FORMATS`
names are ``sl.sparsify(weights=...)``'s: ``"int8"`` (blocks of 32), ``"int8_b64"``,
``"int8_rows"``, ``"int8_rowcol"``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = ["INT8_FORMATS", "Int8Blocks", "Int8Rows", "load_int8", "output_scales", "quantize_int8",
           "quantize_mlp_int8", "round_x_int8", "save_int8"]


@dataclass(frozen=True)
class Int8Rows:
    """int8 weights ``q [I, H]`` with float32 per-row scales ``scale [I]`` and, optionally,
    float32 per-column scales ``col_scale [H]``: ``w[i, k] ~ scale[i] * col_scale[k] * q[i, k]``."""

    q: torch.Tensor
    scale: torch.Tensor
    col_scale: torch.Tensor | None = None

    def __post_init__(self):
        if not isinstance(self.q, torch.Tensor) or self.q.dtype != torch.int8 or self.q.dim() != 2:
            raise ValueError("Int8Rows.q must be a 2-D torch.int8 tensor")
        for name, want in (("scale", self.q.shape[0]), ("col_scale", self.q.shape[1])):
            v = getattr(self, name)
            if v is None and name == "col_scale":
                continue
            if not isinstance(v, torch.Tensor) or v.dtype != torch.float32 or tuple(v.shape) != (want,):
                raise ValueError(f"Int8Rows.{name} must be float32 [{want}], got "
                                 f"{getattr(v, 'dtype', type(v))} {tuple(getattr(v, 'shape', ()))}")

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    def dequantize(self) -> torch.Tensor:
        w = self.q.to(torch.float32) * self.scale[:, None]
        return w if self.col_scale is None else w * self.col_scale[None, :]

    def scales2d(self) -> torch.Tensor:
        """Scales as ``[I, n_blocks]`` (one block per row here)."""
        return self.scale[:, None]

    def t(self) -> Int8Rows:
        """Requantized transpose (for ``down_t`` from ``down_proj``): rounds again."""
        return quantize_int8(self.dequantize().t().contiguous(),
                             col_scales=self.col_scale is not None)


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


def _column_scales(w: torch.Tensor) -> torch.Tensor:
    """Per-column scales: each column's largest magnitude, divided by their geometric mean
    (so the row scales stay of the weights' order); columns of zeros get 1."""
    amax = w.abs().amax(0)
    nz = amax > 0
    if not nz.any():
        return torch.ones(w.shape[1], dtype=torch.float32)
    c = torch.where(nz, amax, torch.ones_like(amax))
    c = torch.where(nz, c / torch.exp(torch.log(c[nz]).mean()), c)
    return c.to(torch.float32).contiguous()


def quantize_int8(w, block: int | None = None, col_scales: bool = False):
    """Symmetric int8 quantization of a 2-D float weight (any float dtype).

        >>> q = quantize_int8(gate_proj.weight)              # per-row scales (kernel format)
        >>> qb = quantize_int8(gate_proj.weight, block=32)   # per-block scales (quality study)
        >>> qd = quantize_int8(down_proj.weight.t(), col_scales=True)  # rows x columns

    ``col_scales=True`` (per-row only): the columns are first divided by their own scales
    (each column's largest magnitude, normalised to geometric mean 1), then each row is
    quantized as usual, so ``w ~ scale[:, None] * q * col_scale[None, :]``. A column whose
    weights are all large (on ``down_t`` an output channel of the residual stream with
    massive activations) then gets its own step, and a row's scale no longer follows its
    one outlier column. ValueError for non-2-D, non-float, non-finite weights, a row length
    that is not a multiple of ``block``, or ``block`` with ``col_scales``.
    """
    if not isinstance(w, torch.Tensor) or not w.is_floating_point():
        raise ValueError(f"w must be a floating-point torch tensor, got "
                         f"{getattr(w, 'dtype', type(w).__name__)}")
    if w.dim() != 2 or w.numel() == 0:
        raise ValueError(f"w must be a non-empty 2-D weight, got shape {tuple(w.shape)}")
    w = w.detach().to(torch.float32)
    if not torch.isfinite(w).all():
        raise ValueError("w has non-finite values")
    if col_scales and block is not None:
        raise ValueError("col_scales=True goes with per-row scales (block=None), "
                         f"got block={block!r}")
    if block is None:
        col = _column_scales(w) if col_scales else None
        q, scale = _absmax_quant(w if col is None else w / col[None, :])
        return Int8Rows(q.contiguous(), scale, col)
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
    (``name.q``, ``name.scale``: ``[I]`` per row, ``[I, H / block]`` per block; and
    ``name.col_scale`` ``[H]`` where a per-row weight has column scales)."""
    from safetensors.torch import save_file

    tensors = {}
    for name, w in weights.items():
        if not isinstance(w, (Int8Rows, Int8Blocks)):
            raise ValueError(f"{name}: expected Int8Rows or Int8Blocks, got {type(w).__name__}")
        tensors[f"{name}.q"] = w.q.contiguous()
        tensors[f"{name}.scale"] = w.scale.contiguous()
        if getattr(w, "col_scale", None) is not None:
            tensors[f"{name}.col_scale"] = w.col_scale.contiguous()
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
        if f"{n}.q" not in t or f"{n}.scale" not in t:
            raise ValueError(f"{path}: {n!r} lacks its .q or .scale tensor")
        q, sc, col = t[f"{n}.q"], t[f"{n}.scale"], t.get(f"{n}.col_scale")
        out[n] = (Int8Rows(q, sc, col) if sc.dim() == 1
                  else Int8Blocks(q, sc, q.shape[1] // max(1, sc.shape[1])))
    return out


# the block sizes the kernels run (a multiple of 32 that divides their 256-weight passes);
# Int8Blocks of any other size are for study
KERNEL_BLOCKS = (32, 64, 128, 256)


def stacked_scales(gate, up, down_t) -> np.ndarray:
    """The kernels' ``[I, 3, n_blocks]`` float32 scales of one layer's int8 weights;
    ValueError unless all three share one format the kernels run."""

    for name, w in (("gate", gate), ("up", up)):
        if getattr(w, "col_scale", None) is not None:
            raise ValueError(f"{name} has column scales: the kernels take them on down_t only "
                             "(a scale per output channel); quantize gate and up per row or block")
    kinds = {(type(w), getattr(w, "block", None)) for w in (gate, up, down_t)}
    if len(kinds) != 1:
        raise ValueError("gate, up and down_t must share one int8 format (all per-row or all "
                         "per-block with the same block)")
    if isinstance(gate, Int8Blocks) and gate.block not in KERNEL_BLOCKS:
        raise ValueError(f"the kernels take int8 blocks of {KERNEL_BLOCKS}, got {gate.block}")
    return np.ascontiguousarray(np.stack(
        [gate.scales2d().numpy(), up.scales2d().numpy(), down_t.scales2d().numpy()], 1))


def output_scales(down_t) -> np.ndarray | None:
    """``down_t``'s column scales (one per output channel, float32 ``[H]``), which the
    kernels multiply into ``y`` after the down pass; None without."""
    col = getattr(down_t, "col_scale", None)
    return None if col is None else np.ascontiguousarray(col.numpy(), dtype=np.float32)


# sl.sparsify(weights=...) int8 formats: how each layer's (gate, up, down_t) is quantized
INT8_FORMATS = {
    "int8": {"block": 32},
    "int8_b64": {"block": 64},
    "int8_rows": {"block": None},
    # per-row, and down_t also per output channel (gate/up gained nothing from column
    # scales on SmolLM2; down's massive output channels are what per-row scales lose)
    "int8_rowcol": {"block": None, "down_col_scales": True},
}


def quantize_mlp_int8(gate, up, down_t, block: int | None = None,
                      down_col_scales: bool = False) -> tuple:
    """One layer's int8 weights as the kernels read them (any float ``[I, H]`` tensors).

        >>> qg, qu, qd = quantize_mlp_int8(gate_w, up_w, down_w.t(), **INT8_FORMATS["int8_rowcol"])
    """
    return (quantize_int8(gate, block), quantize_int8(up, block),
            quantize_int8(down_t, block, col_scales=down_col_scales))
