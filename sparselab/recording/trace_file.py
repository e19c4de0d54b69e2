"""Trace files: one safetensors file whose header carries the JSON metadata (no pickle).

    >>> save_trace(trace, "smollm2.trace")      # == trace.save(...); atomic (temp + rename)
    >>> load_trace("smollm2.trace")             # == sl.Trace.load(...)

A truncated, corrupted or foreign file raises :class:`TraceFileError` saying which.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sparselab.recording.trace import TOKEN_FIELDS, Trace

__all__ = ["FORMAT", "FORMAT_VERSION", "TraceFileError", "load_trace", "save_trace"]

FORMAT = "sparselab.trace"
FORMAT_VERSION = 1


class TraceFileError(ValueError):
    """A trace file that is truncated, corrupted or not a sparselab trace."""


def save_trace(trace: Trace, path: str | os.PathLike) -> Path:
    """Write ``trace`` to one safetensors file, atomically (temp file + rename)."""
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
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={FORMAT: json.dumps(header)})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_trace(path: str | os.PathLike) -> Trace:
    """Read a file written by :func:`save_trace`; clear errors for truncated or foreign files."""
    from safetensors.torch import load_file

    path = Path(path)
    header = _read_header(path)
    try:
        tensors = load_file(str(path))
    except Exception as err:  # safetensors' own error type for bad offsets or dtypes
        raise TraceFileError(f"{path} is a corrupted sparselab trace: {err}") from err
    arrays = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("array.")}
    tokens = {k.split(".", 1)[1]: v.numpy() for k, v in tensors.items() if k.startswith("token.")}
    missing = [f for f in TOKEN_FIELDS if f not in tokens]
    if missing:
        raise TraceFileError(f"{path} is missing token fields {missing}")
    return Trace(
        layers=tuple(header["layers"]),
        arrays=arrays,
        pieces=header.get("pieces"),
        meta=header.get("meta", {}),
        **{f: tokens[f] for f in TOKEN_FIELDS},
    )


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
