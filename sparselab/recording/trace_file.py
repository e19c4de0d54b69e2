"""Trace files: one safetensors file whose header carries the JSON metadata (no pickle).

    >>> save_trace(trace, "smollm2.trace")      # == trace.save(...); atomic (temp + rename)
    >>> load_trace("smollm2.trace")             # == sl.Trace.load(...)

A truncated, corrupted or foreign file raises :class:`TraceFileError` saying which.

A save writes ``.smollm2.trace.sparselab-tmp.<pid>.<random>`` beside the target and renames
it over the target. A writer killed before the rename (SIGKILL, out of memory) leaves that
temporary; the next save or load of the same path removes it once its writer is gone
(:mod:`sparselab._temporaries`), never a temporary another live process is writing.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sparselab._temporaries import remove_stale, temp_file
from sparselab.recording.trace import COMPUTED, TOKEN_FIELDS, Trace

__all__ = ["FORMAT", "FORMAT_VERSION", "TraceFileError", "load_trace", "save_trace"]

FORMAT = "sparselab.trace"
FORMAT_VERSION = 1


class TraceFileError(ValueError):
    """A trace file that is truncated, corrupted or not a sparselab trace."""


def save_trace(trace: Trace, path: str | os.PathLike) -> Path:
    """Write ``trace`` to one safetensors file, atomically (temp file + rename).

        >>> save_trace(trace, "smollm2.trace")    # stale temporaries of it are removed first
    """
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {f"array.{k}": v.contiguous() for k, v in trace.arrays.items()}
    for name in TOKEN_FIELDS:
        arr = getattr(trace, name)
        tensors[f"token.{name}"] = torch.from_numpy(arr.astype(np.int64))
    header = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "layers": list(trace.layers),
        "pieces": trace.pieces,
        "meta": trace.meta,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path, ("tmp",))
    fd, tmp = temp_file(path)
    os.close(fd)
    try:
        save_file(tensors, str(tmp), metadata={FORMAT: json.dumps(header)})
        # mkstemp makes the file private (0600); keep the mode of the file it replaces, or
        # what a plain open() would give under the user's umask
        os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def load_trace(path: str | os.PathLike) -> Trace:
    """Read a file written by :func:`save_trace`; clear errors for truncated or foreign files.

        >>> trace = load_trace("smollm2.trace")   # stale temporaries of it are removed first
    """
    from safetensors.torch import load_file

    path = Path(path)
    remove_stale(path, ("tmp",))
    header = _read_header(path)
    try:
        tensors = load_file(str(path))
    except Exception as err:  # safetensors' own error type for bad offsets or dtypes
        raise TraceFileError(f"{path} is a corrupted sparselab trace: {err}") from err
    arrays = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("array.")}
    tokens = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("token.")}
    _check_contents(path, header, arrays, tokens)
    tokens = {k: v.numpy() for k, v in tokens.items()}
    return Trace(
        layers=tuple(header["layers"]),
        arrays=arrays,
        pieces=header.get("pieces"),
        meta=header.get("meta", {}),
        **{f: tokens[f] for f in TOKEN_FIELDS},
    )


_STORED_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _check_contents(path: Path, header: dict[str, Any], arrays: dict[str, torch.Tensor],
                    tokens: dict[str, torch.Tensor]) -> None:
    """The header's fields have the types :func:`save_trace` writes and the tensors the
    shapes and dtypes the header implies; else :class:`TraceFileError` naming the field."""
    def bad(what: str) -> TraceFileError:
        return TraceFileError(f"{path} is not a valid sparselab trace: {what}")

    layers = header.get("layers")
    if not isinstance(layers, list) or any(isinstance(i, bool) or not isinstance(i, int) for i in layers):
        raise bad(f"'layers' must be a list of layer numbers, got {layers!r:.80}")
    meta = header.get("meta", {})
    if not isinstance(meta, dict):
        raise bad(f"'meta' must be a JSON object, got {type(meta).__name__}")
    missing = [f for f in TOKEN_FIELDS if f not in tokens]
    if missing:
        raise TraceFileError(f"{path} is missing token fields {missing}")
    n = int(tokens["token_ids"].shape[0]) if tokens["token_ids"].ndim == 1 else -1
    for name in TOKEN_FIELDS:
        t = tokens[name]
        if t.dtype != torch.int64 or t.ndim != 1 or t.shape[0] != n:
            raise bad(f"token field {name!r} must be int64 [{n}], got {t.dtype} {list(t.shape)}")
    pieces = header.get("pieces")
    if pieces is not None and (not isinstance(pieces, list) or len(pieces) != n
                               or not all(isinstance(p, str) for p in pieces)):
        raise bad(f"'pieces' must be null or a list of {n} strings")
    stored = meta.get("store_dtype")
    for name, a in arrays.items():
        if a.ndim != 3 or a.shape[0] != len(layers) or a.shape[1] != n:
            raise bad(f"array {name!r} must be [{len(layers)} layers, {n} tokens, width], "
                      f"got {list(a.shape)}")
        if name == COMPUTED:
            _check_computed(a, arrays, meta, bad)
            continue
        if not a.is_floating_point():
            raise bad(f"array {name!r} must hold floats, got {a.dtype}")
        if name in ("h", "gate") and stored in _STORED_DTYPES and a.dtype != _STORED_DTYPES[stored]:
            raise bad(f"array {name!r} is {a.dtype} but the trace was recorded as {stored} "
                      "(the file was altered)")


def _check_computed(bits: torch.Tensor, arrays: dict[str, torch.Tensor], meta: dict[str, Any],
                    bad) -> None:
    """A sparse recording's ``computed`` array: int64 words, as many as the neurons need."""
    from sparselab._fast.masks import n_words

    if bits.dtype != torch.int64:
        raise bad(f"array 'computed' must hold packed bits as int64, got {bits.dtype}")
    widths = [int(arrays[k].shape[2]) for k in ("h", "gate") if k in arrays]
    n = widths[0] if widths else meta.get("intermediate_size")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1 or bits.shape[2] != n_words(n):
        raise bad(f"array 'computed' has {bits.shape[2]} words per token, which does not "
                  f"fit {n!r} neurons")


def _read_header(path: Path) -> dict[str, Any]:
    """Validate a safetensors trace file's framing before handing it to safetensors.

    safetensors' own errors for a cut file are cryptic; checking the declared data size
    against the file size lets us say "truncated" plainly.
    """
    if not path.is_file():
        raise FileNotFoundError(f"no trace file at {path}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise TraceFileError(f"{path} is truncated or empty ({size} bytes): not a sparselab trace")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100_000_000:
            raise TraceFileError(
                f"{path} is not a sparselab trace, or is truncated (header claims {n} bytes, "
                f"file has {size})"
            )
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise TraceFileError(f"{path} is not a sparselab trace (unreadable header)") from err
    try:
        meta = json.loads(header["__metadata__"][FORMAT])
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise TypeError
    except (KeyError, TypeError, json.JSONDecodeError):
        raise TraceFileError(
            f"{path} is a safetensors file but not a sparselab trace (no {FORMAT!r} metadata)"
        ) from None
    try:
        end = max(
            (int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"),
            default=0,
        )
    except (KeyError, TypeError, IndexError, ValueError):
        raise TraceFileError(
            f"{path} is not a sparselab trace (malformed safetensors header)"
        ) from None
    if 8 + n + end > size:
        raise TraceFileError(
            f"{path} is truncated: {size} bytes on disk, {8 + n + end} expected"
        )
    if meta.get("version", 0) > FORMAT_VERSION:
        raise TraceFileError(
            f"{path} was written by a newer sparselab (format {meta['version']}); upgrade"
        )
    return meta
