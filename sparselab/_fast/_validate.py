"""Argument checks for the buffers the compiled kernels read (shape, dtype, contiguity).

Every public entry point of :mod:`sparselab._fast` runs these *before* any state changes,
so a bad argument raises ``ValueError`` naming the problem and leaves caches untouched;
the Cython modules behind them trust their inputs.
"""

from __future__ import annotations

import numpy as np
import torch

from sparselab._fast import _mlp
from sparselab._fast.quant import Int8Blocks, Int8Rows

ACTIVATIONS = ("silu", "gelu_tanh", "relu")
_ACTIVATION_CODES = {"silu": _mlp.ACT_SILU, "gelu_tanh": _mlp.ACT_GELU_TANH, "relu": _mlp.ACT_RELU}
# OpenMP starts every thread asked for; far past the cores that only costs memory, and
# 100k threads exhaust it (the process dies instead of raising)
MAX_THREADS = 256
WEIGHT_DTYPES = (torch.float32, torch.bfloat16)
OUT_DTYPES = (torch.float32, torch.bfloat16)


def activation_code(activation) -> int:
    """The compiled kernels' code for an activation name; ValueError for unknown names."""
    if activation not in _ACTIVATION_CODES:
        raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    return _ACTIVATION_CODES[activation]


def n_words(n_neurons: int) -> int:
    """Number of uint64 words holding ``n_neurons`` bits."""
    return (n_neurons + 63) // 64


def check_n_neurons(n_neurons) -> int:
    if isinstance(n_neurons, bool) or not isinstance(n_neurons, (int, np.integer)):
        raise ValueError(f"n_neurons must be an int, got {type(n_neurons).__name__}")
    if n_neurons < 0:
        raise ValueError(f"n_neurons must be >= 0, got {n_neurons}")
    return int(n_neurons)


def as_numpy(a, name: str) -> np.ndarray:
    """A numpy view of a CPU tensor or an array (no copy when already an array)."""
    if isinstance(a, torch.Tensor):
        if a.device.type != "cpu":
            raise ValueError(f"{name} must be on the CPU, got device {a.device}")
        if a.dtype == torch.bfloat16:
            raise ValueError(f"{name} must not be bfloat16 here")
        return a.detach().numpy()
    if isinstance(a, np.ndarray):
        return a
    raise ValueError(f"{name} must be a numpy array or a torch tensor, got {type(a).__name__}")


def bool_array(mask, name: str) -> np.ndarray:
    arr = as_numpy(mask, name)
    if arr.dtype != np.bool_:
        raise ValueError(f"{name} must be boolean, got dtype {arr.dtype}")
    if arr.ndim < 1:
        raise ValueError(f"{name} must have at least one dimension, got a scalar")
    return np.ascontiguousarray(arr)


def word_array(words, name: str, ndims: tuple[int, ...]) -> np.ndarray:
    arr = as_numpy(words, name)
    if arr.dtype != np.uint64:
        raise ValueError(f"{name} must be packed uint64 words, got dtype {arr.dtype}")
    if arr.ndim not in ndims:
        raise ValueError(f"{name} must have {' or '.join(map(str, ndims))} dimension(s), "
                         f"got shape {arr.shape}")
    # masks are a few hundred bytes: a contiguous copy is cheaper than a strided kernel
    return np.ascontiguousarray(arr)


def check_tail(words2d: np.ndarray, n_neurons: int, name: str) -> None:
    if n_neurons % 64 == 0 or words2d.shape[-1] == 0:
        return
    if np.any(words2d[..., -1] >> np.uint64(n_neurons % 64)):
        raise ValueError(f"{name} has bits set at or beyond n_neurons={n_neurons} "
                         "(wrong mask length or wrong n_neurons?)")


def check_threads(n_threads) -> int:
    if n_threads is None:
        return max(1, torch.get_num_threads())
    if isinstance(n_threads, bool) or not isinstance(n_threads, (int, np.integer)):
        raise ValueError(f"n_threads must be an int, got {type(n_threads).__name__}")
    if not 1 <= n_threads <= MAX_THREADS:
        raise ValueError(f"n_threads must be in [1, {MAX_THREADS}], got {n_threads}")
    return int(n_threads)


def check_x_int8(x_int8, dtype: torch.dtype) -> bool:
    """``x_int8`` is a bool, and True only for int8 weights (the integer dot products)."""
    if not isinstance(x_int8, (bool, np.bool_)):
        raise ValueError(f"x_int8 must be True or False, got {x_int8!r}")
    if x_int8 and dtype != torch.int8:
        raise ValueError(f"x_int8=True needs int8 weights (quantize_int8), got {dtype}")
    return bool(x_int8)


def check_weight(t, name: str, dtype=None) -> tuple[torch.Tensor, np.ndarray]:
    """Check a 2-D CPU weight and return it with a numpy view of its bits (uint16 for bf16).
    An :class:`~sparselab._fast.quant.Int8Rows` gives its int8 tensor (dtype ``torch.int8``;
    the caller takes the scales)."""
    if isinstance(t, (Int8Rows, Int8Blocks)):
        if dtype is not None and dtype != torch.int8:
            raise ValueError(f"{name} is int8 but the other weights are {dtype}")
        q = t.q
        if q.device.type != "cpu" or not q.is_contiguous() or q.shape[0] == 0 or q.shape[1] == 0:
            raise ValueError(f"{name}: int8 weights must be non-empty, contiguous, on the CPU")
        return q.detach(), q.detach().numpy()
    if dtype == torch.int8:
        raise ValueError(f"{name} is {getattr(t, 'dtype', type(t).__name__)} but the other "
                         "weights are int8 (pass every weight through quantize_int8)")
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise ValueError(f"{name} must be on the CPU, got device {t.device}")
    if t.dtype not in WEIGHT_DTYPES:
        raise ValueError(f"{name} has dtype {t.dtype}; expected torch.float32 or torch.bfloat16")
    if dtype is not None and t.dtype != dtype:
        raise ValueError(f"{name} has dtype {t.dtype} but the other weights are {dtype}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(t.shape)}")
    # a silent .contiguous() would be a hidden full copy of the weight: refuse instead
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (row-major), got strides {t.stride()}")
    t = t.detach()
    return t, bits_view(t)


def bits_view(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def prep_x(x, hidden: int, dtype: torch.dtype) -> tuple[np.ndarray, bool]:
    """x [B, H] or [H] of the weights' dtype -> (float32 contiguous [B, H], was_1d)."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x must be a torch tensor, got {type(x).__name__}")
    if x.device.type != "cpu":
        raise ValueError(f"x must be on the CPU, got device {x.device}")
    if dtype == torch.int8:
        if x.dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"x has dtype {x.dtype}; int8 weights take float32 or bfloat16 x")
    elif x.dtype != dtype:
        raise ValueError(f"x has dtype {x.dtype} but the weights are {dtype}")
    if x.dim() not in (1, 2):
        raise ValueError(f"x must be [batch, hidden] or [hidden], got shape {tuple(x.shape)}")
    if x.shape[-1] != hidden:
        raise ValueError(f"x has hidden size {x.shape[-1]}, the weights have {hidden}")
    was_1d = x.dim() == 1
    # x is a few kB: converting it once to contiguous float32 is free next to the weights
    x32 = x.detach().reshape(-1, hidden).to(torch.float32).contiguous()
    return x32.numpy(), was_1d


def resolve_out_dtype(out_dtype, dtype: torch.dtype) -> torch.dtype:
    if out_dtype is None:
        return torch.float32 if dtype == torch.int8 else dtype
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"out_dtype must be torch.float32 or torch.bfloat16, got {out_dtype}")
    return out_dtype


def finish(y32: torch.Tensor, was_1d: bool, out_dtype: torch.dtype) -> torch.Tensor:
    y = y32 if out_dtype == torch.float32 else y32.to(out_dtype)
    return y[0] if was_1d else y


_BUNDLE_NP = {torch.float32: np.float32, torch.bfloat16: np.uint16}


def check_bundle(bundle, name: str, dtype: torch.dtype) -> np.ndarray:
    """Check a bundled ``[I, 3, H]`` weight array (gate row, up row, down column of each
    neuron adjacent; float32, or bfloat16 stored as uint16 bits) and return it as is (a
    read-only memory map stays a memory map: nothing is copied)."""
    if dtype not in _BUNDLE_NP:
        raise ValueError(f"{name}: dtype must be torch.float32 or torch.bfloat16, got {dtype}")
    if not isinstance(bundle, np.ndarray):
        raise ValueError(f"{name} must be a numpy array [I, 3, H], got {type(bundle).__name__}")
    if bundle.ndim != 3 or bundle.shape[1] != 3 or bundle.shape[0] == 0 or bundle.shape[2] == 0:
        raise ValueError(f"{name} must have shape [I, 3, H] (I, H > 0), got {bundle.shape}")
    if bundle.dtype != _BUNDLE_NP[dtype]:
        raise ValueError(f"{name} has numpy dtype {bundle.dtype}; {dtype} is stored as "
                         f"{np.dtype(_BUNDLE_NP[dtype])}")
    if not bundle.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous")
    return bundle
