"""MLP weights on disk, bundled by neuron: one read fetches a neuron's gate row, up row and
down column (LLM in a Flash's row-column bundling), memory-mapped so nothing is read until
a kernel touches it.

    >>> path = write_mlp_file(model, "smollm2.mlpw")          # once, from any loaded model
    >>> wf = MLPWeightFile(path)                               # mmap, nothing read yet
    >>> wf.layer(3).shape                                      # (I, 3, H): gate, up, down_t rows
    >>> handle = sl.sparsify(model, predictors, weight_file=wf)   # MLP weights leave RAM

Layout (little-endian): the 8-byte magic ``SLMLPW1\\0``, a uint64 header length, a UTF-8
JSON header (shapes, dtype, the model layers stored, a fingerprint of each layer), zero
padding to a 4096-byte boundary, then for each stored layer an ``[I, 3, H]`` C-contiguous
array (float32, or bfloat16 as its raw 16 bits): ``[j, 0]`` gate row, ``[j, 1]`` up row,
``[j, 2]`` column ``j`` of ``down``. No pickle: the header is JSON, the data raw numbers.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import mmap
import os
import struct
from pathlib import Path

import numpy as np
import torch
from torch import nn

__all__ = ["FORMAT_VERSION", "MAGIC", "MLPWeightFile", "drop_layer_weights", "make_resident",
           "restore_layer_weights", "write_mlp_file"]

MAGIC = b"SLMLPW1\0"
FORMAT_VERSION = 1
_ALIGN = 4096
_NP = {"float32": np.float32, "bfloat16": np.uint16}
_TORCH = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _dtype_name(dtype: torch.dtype) -> str:
    for name, t in _TORCH.items():
        if t == dtype:
            return name
    raise ValueError(f"the weight file stores float32 or bfloat16 MLP weights, the model is {dtype}")


def _raw(t: torch.Tensor) -> np.ndarray:
    t = t.detach().contiguous()
    return t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else t.numpy()


def _fingerprint(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> str:
    """sha256 of the first and last neuron's bundle: tells one model's weights from another's
    without reading a layer (shapes alone do not: two fine-tunes share them)."""
    h = hashlib.sha256()
    for j in (0, gate.shape[0] - 1):
        for row in (gate[j], up[j], down[:, j]):
            h.update(_raw(row).tobytes())
    return h.hexdigest()


def _layer_weights(spec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gate, up = spec.gate_up_weights()
    return gate.detach(), up.detach(), spec.down_proj.weight.detach()


def write_mlp_file(model: nn.Module, path, layers=None) -> Path:
    """Write the gated MLP weights of ``model`` to ``path`` bundled by neuron; returns the path.

        >>> write_mlp_file(model, "model.mlpw")                 # every layer
        >>> write_mlp_file(model, "model.mlpw", layers=[0, 1])  # some layers

    One layer at a time (the transient is one ``[I, 3, H]`` layer), to a temporary file
    renamed into place, so a crash never leaves a half-written file under ``path``.
    Raises ``ValueError`` for a sparsified model (restore it first), biases, or a dtype
    other than float32/bfloat16.
    """
    from tqdm.auto import tqdm

    from sparselab.models import adapter_for
    from sparselab.runtime.sparse_mlp import is_sparsified

    adapter = adapter_for(model)
    if is_sparsified(model):
        raise ValueError("the model is sparsified: restore it before writing its MLP weights")
    chosen = list(range(adapter.n_layers)) if layers is None else [int(i) for i in layers]
    if not chosen or any(not 0 <= i < adapter.n_layers for i in chosen) or len(set(chosen)) != len(chosen):
        raise ValueError(f"layers must be distinct numbers in [0, {adapter.n_layers}), got {chosen}")
    specs = [adapter.layers[i] for i in chosen]
    if any(s.has_bias for s in specs):
        raise ValueError("the weight file stores bias-free gated MLPs; this model has MLP biases")
    gate0, _, _ = _layer_weights(specs[0])
    dtype = _dtype_name(gate0.dtype)
    n, hidden = int(gate0.shape[0]), int(gate0.shape[1])
    itemsize = np.dtype(_NP[dtype]).itemsize
    layer_bytes = n * 3 * hidden * itemsize
    fingerprints = [_fingerprint(*_layer_weights(s)) for s in specs]
    header = {"format": "sparselab-mlp-bundle", "version": FORMAT_VERSION, "dtype": dtype,
              "n_neurons": n, "hidden": hidden, "layers": chosen, "layer_bytes": layer_bytes,
              "fingerprints": fingerprints,
              "model": str(getattr(getattr(model, "config", None), "_name_or_path", ""))}
    header["data_offset"] = 10**19  # the widest it can be: the real offset's header fits
    offset = -(-(16 + len(json.dumps(header).encode())) // _ALIGN) * _ALIGN
    header["data_offset"] = offset
    blob = json.dumps(header).encode()
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(MAGIC + struct.pack("<Q", len(blob)) + blob)
            f.write(b"\0" * (offset - f.tell()))
            for spec in tqdm(specs, desc="writing MLP weights", leave=False):
                gate, up, down = _layer_weights(spec)
                if gate.shape != (n, hidden) or up.shape != (n, hidden) or down.shape != (hidden, n):
                    raise ValueError(f"layer {spec.index} has MLP shapes {tuple(gate.shape)}, "
                                     f"{tuple(up.shape)}, {tuple(down.shape)}; expected one shape "
                                     "for every layer")
                f.write(_raw(torch.stack([gate, up, down.t()], dim=1)).tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


_libc = None


def _mincore(addr: int, length: int) -> np.ndarray:
    """One byte per page of ``[addr, addr + length)``: bit 0 set when the page is resident."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    page = mmap.PAGESIZE
    vec = np.zeros(-(-length // page), dtype=np.uint8)
    if length and _libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(length),
                                vec.ctypes.data_as(ctypes.c_void_p)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mincore failed: {os.strerror(err)}")
    return vec


class MLPWeightFile:
    """A weight file written by :func:`write_mlp_file`, memory-mapped read-only.

        >>> wf = MLPWeightFile("model.mlpw")
        >>> wf.layer(3)                     # [I, 3, H] numpy view into the mapping (no read)
        >>> wf.resident_bytes()             # its pages in RAM now (mincore)
        >>> wf.drop_pages()                 # evict them, so the next run reads from storage

    ``advice="random"`` (default) turns off the kernel's read-ahead on the mapping, so a
    neuron fault reads its own pages, not the next 128 kB; ``"normal"`` keeps it. Raises
    ``ValueError`` (nothing mapped) for a file that is not one, of another version, or
    truncated.
    """

    def __init__(self, path, advice: str = "random") -> None:
        if advice not in ("random", "normal"):
            raise ValueError(f"advice must be 'random' or 'normal', got {advice!r}")
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(16)
            if len(head) < 16 or head[:8] != MAGIC:
                raise ValueError(f"{self.path} is not a sparselab MLP weight file (bad magic)")
            (n_header,) = struct.unpack("<Q", head[8:])
            if n_header > min(size, 1 << 26):
                raise ValueError(f"{self.path}: header length {n_header} exceeds the file")
            try:
                header = json.loads(f.read(n_header).decode())
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                raise ValueError(f"{self.path}: unreadable header ({err})") from err
        if header.get("version") != FORMAT_VERSION or header.get("dtype") not in _NP:
            raise ValueError(f"{self.path}: format version {header.get('version')!r}, dtype "
                             f"{header.get('dtype')!r}; this sparselab reads version {FORMAT_VERSION}")
        self.header = header
        self.n_neurons, self.hidden = int(header["n_neurons"]), int(header["hidden"])
        self.layers = tuple(int(i) for i in header["layers"])
        self.dtype = _TORCH[header["dtype"]]
        self.layer_bytes = int(header["layer_bytes"])
        self.data_offset = int(header["data_offset"])
        self.nbytes = self.layer_bytes * len(self.layers)
        expected = self.data_offset + self.nbytes
        if size != expected:
            raise ValueError(f"{self.path} is {'truncated' if size < expected else 'too long'}: "
                             f"{size} bytes, its header says {expected}")
        self._fd = os.open(self.path, os.O_RDONLY)
        self._mm = mmap.mmap(self._fd, size, access=mmap.ACCESS_READ)
        if advice == "random":
            self._mm.madvise(mmap.MADV_RANDOM)
        self._bytes = np.frombuffer(self._mm, dtype=np.uint8)
        self._addr = self._bytes.ctypes.data
        shape = (self.n_neurons, 3, self.hidden)
        self._arrays = {
            layer: self._bytes[self.data_offset + k * self.layer_bytes:
                               self.data_offset + (k + 1) * self.layer_bytes]
            .view(_NP[header["dtype"]]).reshape(shape)
            for k, layer in enumerate(self.layers)
        }

    def __repr__(self) -> str:
        return (f"MLPWeightFile({str(self.path)!r}, layers={len(self.layers)}, "
                f"I={self.n_neurons}, H={self.hidden}, {self.header['dtype']}, "
                f"{self.nbytes / 2**20:.1f} MiB)")

    def layer(self, layer: int) -> np.ndarray:
        """Model layer ``layer``'s ``[I, 3, H]`` read-only view (float32, or bf16 as uint16)."""
        if layer not in self._arrays:
            raise ValueError(f"{self.path} holds layers {list(self.layers)}, not {layer}")
        return self._arrays[layer]

    def check_model(self, model: nn.Module, layers=None) -> None:
        """``ValueError`` unless this file holds ``model``'s MLP weights for ``layers``
        (shapes, dtype, and each layer's fingerprint against the model's own weights)."""
        from sparselab.models import adapter_for

        adapter = adapter_for(model)
        chosen = self.layers if layers is None else tuple(int(i) for i in layers)
        missing = sorted(set(chosen) - set(self.layers))
        if missing:
            raise ValueError(f"{self.path} has no weights for layers {missing}")
        for i in chosen:
            gate, up, down = _layer_weights(adapter.layers[i])
            if tuple(gate.shape) != (self.n_neurons, self.hidden) or gate.dtype != self.dtype:
                raise ValueError(f"{self.path} was written from another model: it holds "
                                 f"[{self.n_neurons}, {self.hidden}] {self.dtype} MLPs, layer {i} "
                                 f"of this model is {list(gate.shape)} {gate.dtype}")
            if _fingerprint(gate, up, down) != self.header["fingerprints"][self.layers.index(i)]:
                raise ValueError(f"{self.path} was written from another model: layer {i}'s "
                                 "weights differ from the file's (same shapes)")

    def resident_bytes(self) -> int:
        """Bytes of the weight data whose pages are in RAM now (``mincore``), whoever read them."""
        return int(np.count_nonzero(self.resident_pages() & 1)) * mmap.PAGESIZE

    def resident_pages(self) -> np.ndarray:
        """``mincore``'s vector over the weight data: one byte per page, bit 0 = resident."""
        start = self._addr + self.data_offset
        return _mincore(start, self.nbytes)

    def prefetch(self, layer: int, neurons: np.ndarray | None = None) -> int:
        """Ask the kernel to start reading the records of ``neurons`` of ``layer`` (all of
        them with None) now, asynchronously (``madvise(MADV_WILLNEED)`` on their page
        ranges, neighbours merged): the faults that follow wait for reads already in flight
        instead of issuing one 4 kB read each. Returns the number of ranges advised.

            >>> wf.prefetch(3, np.array([5, 6, 7, 900]))      # two ranges
        """
        if layer not in self._arrays:
            raise ValueError(f"{self.path} holds layers {list(self.layers)}, not {layer}")
        page = mmap.PAGESIZE
        base = self.data_offset + self.layers.index(layer) * self.layer_bytes
        if neurons is None:
            starts = np.array([base], dtype=np.int64)
            ends = starts + self.layer_bytes
        else:
            nb = np.sort(np.asarray(neurons, dtype=np.int64))
            if nb.size == 0:
                return 0
            record = self.layer_bytes // self.n_neurons
            # runs of consecutive neurons become one range
            brk = np.flatnonzero(np.diff(nb) != 1) + 1
            first = np.concatenate([nb[:1], nb[brk]])
            last = np.concatenate([nb[brk - 1], nb[-1:]])
            starts = base + first * record
            ends = base + (last + 1) * record
        starts = starts // page * page
        for a, b in zip(starts.tolist(), ends.tolist(), strict=True):
            self._mm.madvise(mmap.MADV_WILLNEED, a, b - a)
        return int(starts.size)

    def prefetcher(self, layer: int):
        """``prefetch`` bound to ``layer``: a callable ``f(neurons)`` for the kernels."""
        if layer not in self._arrays:
            raise ValueError(f"{self.path} holds layers {list(self.layers)}, not {layer}")
        return lambda neurons=None: self.prefetch(layer, neurons)

    def drop_pages(self) -> None:
        """Evict the file's pages from this mapping and from the page cache
        (``madvise(MADV_DONTNEED)`` then ``posix_fadvise(POSIX_FADV_DONTNEED)``), so the next
        read comes from storage and counts in ``/proc/self/io`` ``read_bytes``. Pages another
        process maps stay."""
        self._mm.madvise(mmap.MADV_DONTNEED)
        os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def read_layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Fresh in-RAM (gate ``[I, H]``, up ``[I, H]``, down ``[H, I]``) tensors of ``layer``,
        bit for bit what was written (what ``restore()`` puts back)."""
        b = np.array(self.layer(layer))
        t = torch.from_numpy(b)
        if self.dtype == torch.bfloat16:
            t = t.view(torch.int16).view(torch.bfloat16)
        return t[:, 0].contiguous(), t[:, 1].contiguous(), t[:, 2].t().contiguous()

    def close(self) -> None:
        """Unmap and close (views from :meth:`layer` must be gone; ``BufferError`` otherwise)."""
        if self._mm is None:
            return
        self._arrays.clear()
        self._bytes = None
        self._mm.close()
        os.close(self._fd)
        self._mm = None

    def __enter__(self) -> MLPWeightFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()



def _projection_params(spec) -> list[nn.Parameter]:
    mods = [spec.gate_proj] + ([] if spec.fused_gate_up else [spec.up_proj]) + [spec.down_proj]
    return [m.weight for m in mods]


def _file_mappings() -> list[tuple[int, int]]:
    """(start, end) of this process's file-backed mappings (``/proc/self/maps``)."""
    out = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5].startswith("/") and parts[4] != "0":
            a, b = (int(x, 16) for x in parts[0].split("-"))
            out.append((a, b))
    return out


def _release_file_pages(t: torch.Tensor, mappings: list[tuple[int, int]]) -> int:
    """``madvise(MADV_DONTNEED)`` on the whole pages of ``t`` when they lie in a file mapping
    (weights loaded from safetensors share one private mapping of the file: dropping the
    tensor frees nothing there). Returns the bytes released."""
    global _libc
    start, nbytes = t.data_ptr(), t.numel() * t.element_size()
    if not any(a <= start and start + nbytes <= b for a, b in mappings):
        return 0
    page = mmap.PAGESIZE
    lo, hi = -(-start // page) * page, (start + nbytes) // page * page
    if hi <= lo:
        return 0
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    if _libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), 4) != 0:  # MADV_DONTNEED
        return 0
    return hi - lo


def make_resident(model: nn.Module) -> int:
    """Copy every parameter of ``model`` that lives in a file mapping (as loaded from
    safetensors: lazily read, evictable page cache) into anonymous memory, and release its
    file pages; returns the bytes copied.

        >>> make_resident(model)        # before sparsify(..., weight_file=...) under a cap

    Page cache is what a memory cap reclaims first: under a cap, weights left in the
    model file's mapping (the attention, embeddings, norms, LM head) would be evicted and
    read again every token, as if they too were on disk. Copied out, they stay resident
    and are charged to the process that holds them. Values are unchanged (tied weights
    stay tied: one Parameter, one copy)."""
    mappings = _file_mappings()
    copied = 0
    for p in model.parameters():
        t = p.data
        start = t.data_ptr()
        nbytes = t.numel() * t.element_size()
        if nbytes and any(a <= start and start + nbytes <= b for a, b in mappings):
            p.data = t.clone()
            _release_file_pages(t, mappings)
            copied += nbytes
    return copied


def drop_layer_weights(spec) -> int:
    """Replace a layer's gate/up/down weights by empty tensors, so they leave RAM;
    :func:`restore_layer_weights` reads them back from the file. Weights that live in a
    file mapping (as loaded from safetensors) are also released from it (their pages are
    dropped; the mapping, shared with the other weights, stays). Returns those bytes."""
    mappings = _file_mappings()
    released = 0
    for p in _projection_params(spec):
        released += _release_file_pages(p.data, mappings)
        p.data = torch.empty(0, dtype=p.dtype)
    return released


def restore_layer_weights(spec, weight_file: MLPWeightFile) -> None:
    """Put back layer ``spec.index``'s weights from ``weight_file`` (bit for bit)."""
    gate, up, down = weight_file.read_layer(spec.index)
    if spec.fused_gate_up:
        spec.gate_proj.weight.data = torch.cat([gate, up], dim=0)
    else:
        spec.gate_proj.weight.data = gate
        spec.up_proj.weight.data = up
    spec.down_proj.weight.data = down
