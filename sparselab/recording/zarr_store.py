"""Zarr trace stores: a recording written batch by batch to disk, read back lazily.

    >>> trace = sl.record(model, tokenizer, texts, out="run.zarr")          # streamed
    >>> trace = sl.record(model, tokenizer, texts, out="run.zarr", resume=True)  # after a kill
    >>> trace = sl.Trace.open("run.zarr")          # lazy: reads only what a call needs
    >>> trace.activations(3)                       # one layer, float32 [tokens, neurons]
    >>> convert("run.zarr", "run.trace")           # and back: convert("run.trace", "b.zarr")

Layout of a store (Zarr v3, one directory)::

    zarr.json              root attributes: "sparselab" (format, config, model identity,
                           meta) and "progress" (committed tokens, passages done)
    arrays/<name>          [layers, tokens, features] per recorded array (h, gate, ...),
                           chunks (1 layer, ``chunk_tokens`` tokens, all features);
                           ``computed`` (a sparse model's recording) is uint64 words of
                           packed bits, read back as int64 like an in-memory trace's
    tokens/<field>         [tokens] int64 per token field (token_ids, seq_ids, ...)
    masks/bits             optional packed masks, uint64 [layers, tokens, words], of the
                           rule in ``sparselab.masks_rule``

Nothing lost: rows are written first, then ``progress.n_tokens`` is advanced in the root
attributes. Zarr's local store writes every chunk and metadata document to a temporary
file and renames it over the old one, so a kill at any moment (SIGKILL included) leaves
each file either old or new: the committed rows are intact, rows past ``n_tokens`` are
ignored on open and overwritten on resume, and ``*.partial`` temporaries are removed.
A resume checks the model (identity and a weight fingerprint), the recording config and
the passages already held (a digest of each text) before writing anything.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import shutil
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sparselab._heap import trim_heap
from sparselab.models.fingerprint import weight_fingerprint  # re-exported: used on resume
from sparselab.recording.trace import ARRAYS, COMPUTED, TOKEN_FIELDS, Trace

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "LazyArray",
    "StoreMismatch",
    "ZarrTrace",
    "ZarrWriter",
    "convert",
    "is_zarr_path",
    "open_trace",
    "text_digest",
    "weight_fingerprint",
    "write_zarr",
]

FORMAT = "sparselab.zarr_trace"
FORMAT_VERSION = 1
DEFAULT_CHUNK_TOKENS = 1024
_TORCH_TO_NP = {torch.float16: np.float16, torch.float32: np.float32, torch.bfloat16: None}


class StoreMismatch(ValueError):
    """A store that cannot be resumed with this model, config or texts (nothing was written)."""


def is_zarr_path(path: str | os.PathLike) -> bool:
    """True for a ``*.zarr`` path or an existing directory holding a ``zarr.json``."""
    p = Path(path)
    return p.suffix == ".zarr" or (p.is_dir() and (p / "zarr.json").is_file())


def text_digest(text: str) -> str:
    """Short digest of one passage (stored per passage, compared on resume)."""
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def _np_dtype(dtype: torch.dtype, name: str = "h") -> np.dtype:
    """The store's dtype of array ``name`` recorded as ``dtype`` (packed bits: uint64)."""
    if name == COMPUTED:
        if dtype != torch.int64:
            raise ValueError(f"array {COMPUTED!r} holds packed bits as int64 words, not {dtype}")
        return np.dtype(np.uint64)
    if dtype not in _TORCH_TO_NP or _TORCH_TO_NP[dtype] is None:
        raise ValueError(f"a Zarr store keeps float16 or float32 arrays, not {dtype}")
    return np.dtype(_TORCH_TO_NP[dtype])


def _compressors(compression: str | None):
    if compression is None:
        return None
    from zarr.codecs import BloscCodec, ZstdCodec

    if compression == "zstd":
        return ZstdCodec(level=3)
    if compression == "blosc":
        return BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")
    raise ValueError(f"compression must be None, 'zstd' or 'blosc', got {compression!r}")


def _clean_partials(path: Path) -> int:
    """Remove temporaries of writes that a kill interrupted; returns how many."""
    removed = 0
    for tmp in path.rglob("*.partial"):
        tmp.unlink(missing_ok=True)
        removed += 1
    return removed


class ZarrWriter:
    """Appends recorded batches to a Zarr store and commits them (used by ``Recorder(out=)``).

        >>> w = ZarrWriter.create("run.zarr", layers=(0, 1), arrays={"h": (48, torch.float16)},
        ...                       config={...}, meta={...})
        >>> w.append(fields, {("h", 0): t0, ("h", 1): t1}); w.commit(passages=["ab12..."])
    """

    def __init__(self, path: Path, group, header: dict[str, Any], progress: dict[str, Any],
                 background: bool = True) -> None:
        self.path, self.group, self.header, self.progress = path, group, header, progress
        # Writes run on one worker thread, in order, while the model computes the next
        # batch; commits are queued behind the rows they cover, so what is durable is
        # always a prefix of what was appended.
        self._background, self._jobs = background, None
        self.layers = tuple(header["layers"])
        # write every chunk as is: zarr's default first scans each chunk for being all
        # fill value (to skip writing it), a full pass over every batch's data
        def writable(name):
            return group[name].with_config({"write_empty_chunks": True})

        self.arrays = {k: writable(f"arrays/{k}") for k in header["arrays"]}
        self.tokens = {k: writable(f"tokens/{k}") for k in TOKEN_FIELDS}
        self.mask_bits = writable("masks/bits") if header.get("masks_rule") else None
        self.pieces = group["pieces"] if "pieces" in group else None
        self._rule = None
        if self.mask_bits is not None:
            from sparselab.masking.rules import rule_from_dict

            self._rule = rule_from_dict(header["masks_rule"])
        self._n = int(progress["n_tokens"])  # rows written (committed or pending)

    # -- construction -------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        layers: Sequence[int],
        arrays: dict[str, tuple[int, torch.dtype]],
        config: dict[str, Any],
        meta: dict[str, Any],
        chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
        compression: str | None = None,
        masks_rule=None,
        n_neurons: int | None = None,
        pieces: bool = False,
    ) -> ZarrWriter:
        """A new, empty store at ``path`` (which must not exist)."""
        import zarr

        from sparselab._fast.masks import n_words

        path = Path(path)
        if path.exists():
            raise FileExistsError(f"{path} exists: pass resume=True to continue it, or remove it")
        if not isinstance(chunk_tokens, int) or chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be an int >= 1, got {chunk_tokens!r}")
        unknown = set(arrays) - {*ARRAYS, COMPUTED}
        if unknown:
            raise ValueError(f"unknown arrays {sorted(unknown)}; choose from {ARRAYS}")
        dtypes = {name: _np_dtype(dtype, name) for name, (_, dtype) in arrays.items()}
        compressors = _compressors(compression)
        path.parent.mkdir(parents=True, exist_ok=True)
        group = zarr.open_group(str(path), mode="w-")
        n_layers = len(layers)
        for name, (features, _) in arrays.items():
            group.create_array(
                f"arrays/{name}", shape=(n_layers, 0, features), chunks=(1, chunk_tokens, features),
                dtype=dtypes[name], compressors=compressors, fill_value=0,
            )
        for name in TOKEN_FIELDS:
            group.create_array(f"tokens/{name}", shape=(0,), chunks=(chunk_tokens * 16,),
                               dtype=np.int64, compressors=compressors, fill_value=0)
        if pieces:  # the tokenizer's text of each token
            group.create_array("pieces", shape=(0,), chunks=(chunk_tokens * 16,), dtype=str)
        rule_spec = None
        if masks_rule is not None:
            if not masks_rule.fitted:
                raise ValueError(f"masks= needs a fitted rule ({masks_rule.label} needs .fit(trace))")
            if n_neurons is None:
                raise ValueError("masks= needs n_neurons")
            rule_spec = masks_rule.describe()
            words = n_words(n_neurons)
            group.create_array("masks/bits", shape=(n_layers, 0, words), chunks=(1, chunk_tokens, words),
                               dtype=np.uint64, compressors=compressors, fill_value=0)
        header = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "layers": [int(x) for x in layers],
            "arrays": {k: str(d) for k, d in dtypes.items()},
            "n_neurons": n_neurons,
            "chunk_tokens": chunk_tokens,
            "compression": compression,
            "masks_rule": rule_spec,
            "config": config,
            "meta": meta,
        }
        progress = {"n_tokens": 0, "passages": [], "n_seqs": 0, "complete": False}
        group.attrs.update({"sparselab": _jsonable(header), "progress": progress})
        return cls(path, group, header, progress)

    @classmethod
    def resume(cls, path: str | os.PathLike, config: dict[str, Any], model_check: dict[str, Any]) -> ZarrWriter:
        """Reopen a store to continue it; :class:`StoreMismatch` if config or model differ."""
        import zarr

        path = Path(path)
        header, progress = _read_attrs(path)
        stored_model = header["meta"].get("model_check", {})
        if stored_model != model_check:
            raise StoreMismatch(
                f"{path} was recorded with another model ({stored_model}); this one is "
                f"{model_check}: use a new out= path"
            )
        stored = header["config"]
        diff = {k: (stored.get(k), v) for k, v in _jsonable(config).items() if stored.get(k) != v}
        if diff:
            raise StoreMismatch(f"{path} was recorded with another config: " + ", ".join(
                f"{k}={a!r} in the store, {b!r} now" for k, (a, b) in diff.items()))
        _clean_partials(path)
        group = zarr.open_group(str(path), mode="r+")
        writer = cls(path, group, header, progress)
        writer._truncate()
        return writer

    def _truncate(self) -> None:
        """Drop rows past the committed count (a batch a kill interrupted)."""
        n = int(self.progress["n_tokens"])
        optional = [a for a in (self.mask_bits, self.pieces) if a is not None]
        for arr in (*self.arrays.values(), *self.tokens.values(), *optional):
            if arr.shape[-2 if arr.ndim == 3 else 0] != n:
                shape = list(arr.shape)
                shape[1 if arr.ndim == 3 else 0] = n
                arr.resize(tuple(shape))
        self._n = n

    # -- writing ------------------------------------------------------------------------
    @property
    def n_tokens(self) -> int:
        return int(self.progress["n_tokens"])

    def append(self, fields: dict[str, np.ndarray], buffers: dict[tuple[str, int], torch.Tensor],
               pieces: Sequence[str] | None = None) -> None:
        """Write one forward pass's rows (not committed until :meth:`commit`).

        With the background writer (the default) the rows are written on a worker thread
        while the caller goes on; ``buffers`` is not touched after the call returns
        (the job keeps its own references)."""
        rows = len(fields["token_ids"])
        if rows == 0:
            return
        if self.pieces is not None and (pieces is None or len(pieces) != rows):
            raise ValueError(f"this store keeps text pieces: pass {rows} of them")
        start, end = self._n, self._n + rows
        self._n = end
        self._run(self._write_rows, start, end, dict(fields), dict(buffers), pieces)

    def _write_rows(self, start: int, end: int, fields: dict[str, np.ndarray],
                    buffers: dict[tuple[str, int], torch.Tensor], pieces: Sequence[str] | None) -> None:
        # mask bits first: they are computed from buffers that the writes below release
        bits = None
        if self.mask_bits is not None:
            from sparselab._fast.masks import pack

            source = self._rule.source
            bits = np.stack([
                pack(self._rule.mask(buffers[(source, layer)].float(), layer).numpy())
                for layer in self.layers
            ])
        for name, arr in self.arrays.items():
            arr.resize((arr.shape[0], end, arr.shape[2]))
            # layer by layer, each buffer released once written: no stacked copy of the
            # batch (less memory and CPU than one [layers, rows, features] write)
            for j, layer in enumerate(self.layers):
                block = buffers.pop((name, layer)).numpy()
                # packed bits ('computed') are int64 in torch, uint64 here: the same 64 bits
                arr[j, start:end, :] = (block.view(np.uint64) if arr.dtype == np.uint64
                                        else block.astype(arr.dtype, copy=False))
        for name, arr in self.tokens.items():
            arr.resize((end,))
            arr[start:end] = np.asarray(fields[name], dtype=np.int64)
        if self.pieces is not None:
            self.pieces.resize((end,))
            self.pieces[start:end] = np.asarray(list(pieces), dtype=str)
        if bits is not None:
            self.mask_bits.resize((bits.shape[0], end, bits.shape[2]))
            self.mask_bits[:, start:end, :] = bits
        buffers.clear()
        trim_heap()  # the batch's buffers and the store's encode buffers back to the OS

    def commit(self, passages: Sequence[str] = (), n_seqs: int | None = None, complete: bool = False) -> None:
        """Make the rows appended so far durable: one atomic update of the root attributes.

        Queued behind the rows it covers; ``complete=True`` also waits until it is on disk."""
        progress = dict(self.progress)
        progress["n_tokens"] = self._n
        progress["passages"] = list(progress["passages"]) + list(passages)
        if n_seqs is not None:
            progress["n_seqs"] = int(n_seqs)
        progress["complete"] = bool(complete)
        self.progress = progress
        self._run(self._write_progress, progress)
        if complete:
            self.flush()

    def _write_progress(self, progress: dict[str, Any]) -> None:
        self.group.attrs["progress"] = progress

    def _run(self, job, *args) -> None:
        if not self._background:
            job(*args)
            return
        if self._jobs is None:  # started on first use, stopped by close()
            self._jobs = _OrderedJobs()
        self._jobs.submit(job, *args)

    def flush(self) -> None:
        """Wait until every queued write and commit is on disk (re-raises a writer error)."""
        if self._jobs is not None:
            self._jobs.wait()

    def close(self) -> None:
        """Flush and stop the worker thread (idempotent; the store stays readable)."""
        if self._jobs is not None:
            jobs, self._jobs = self._jobs, None
            jobs.close()


class _OrderedJobs:
    """One worker thread running submitted jobs in order; a job's error resurfaces in the
    submitter (at the next submit, wait or close) and later jobs are skipped, so nothing
    is committed past a failed write. At most ``depth`` jobs wait, which bounds the
    memory held by queued batches."""

    def __init__(self, depth: int = 1) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="sparselab-zarr-writer", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            try:
                if job is None:
                    return
                if self._error is None:
                    fn, args = job
                    try:
                        fn(*args)
                    except BaseException as err:  # handed to the submitting thread
                        self._error = err
            finally:
                self._queue.task_done()

    def _raise(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def submit(self, fn, *args) -> None:
        self._raise()
        if not self._thread.is_alive():
            raise RuntimeError("the store's writer thread has stopped")
        self._queue.put((fn, args))

    def wait(self) -> None:
        self._queue.join()
        self._raise()

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.join()
            self._queue.put(None)
            self._thread.join()
        self._raise()

def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def _read_attrs(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Header and progress of a store, with clear errors for anything else."""
    doc = path / "zarr.json"
    if not path.exists():
        raise FileNotFoundError(f"no Zarr trace store at {path}")
    if not doc.is_file():
        raise ValueError(f"{path} is not a Zarr store (no zarr.json)")
    try:
        attrs = json.loads(doc.read_text()).get("attributes", {})
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}/zarr.json is unreadable: {err}") from err
    header, progress = attrs.get("sparselab"), attrs.get("progress")
    if not isinstance(header, dict) or header.get("format") != FORMAT or not isinstance(progress, dict):
        raise ValueError(f"{path} is a Zarr store but not a sparselab trace store")
    if int(header.get("version", 0)) > FORMAT_VERSION:
        raise ValueError(f"{path} was written by a newer sparselab (format {header['version']}); upgrade")
    return header, progress


class LazyArray:
    """One recorded array of a store, ``[layers, tokens, features]``, read on demand.

        >>> lazy = trace.arrays["h"]; lazy.shape; lazy[0]     # layer 0 as a torch tensor
        >>> lazy.to_dask()                                    # dask array over the chunks
        >>> for block in lazy.blocks(0): ...                  # layer 0, chunk by chunk
    """

    def __init__(self, array, n_tokens: int) -> None:
        self._array, self._n = array, int(n_tokens)
        self.dtype = {np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32,
                      np.dtype(np.uint64): torch.int64}[np.dtype(array.dtype)]
        self.shape = torch.Size((array.shape[0], self._n, array.shape[2]))
        self.ndim = 3
        self.chunk_tokens = int(array.chunks[1])

    @staticmethod
    def _tensor(values: np.ndarray) -> torch.Tensor:
        """numpy rows as torch (packed uint64 words as int64, the in-memory trace's dtype)."""
        values = np.ascontiguousarray(values)
        return torch.from_numpy(values.view(np.int64) if values.dtype == np.uint64 else values)

    def __getitem__(self, layer_index: int) -> torch.Tensor:
        if not isinstance(layer_index, (int, np.integer)):
            raise TypeError("index a lazy array by layer position (an int); use .to_dask() for more")
        return self._tensor(self._array[int(layer_index), : self._n, :])

    def rows(self, layer_index: int, start: int, stop: int) -> np.ndarray:
        """Tokens ``start:stop`` of one layer as numpy (the store's dtype)."""
        return self._array[int(layer_index), start : min(stop, self._n), :]

    def blocks(self, layer_index: int) -> Iterator[tuple[int, np.ndarray]]:
        """``(start, rows)`` of one layer, one chunk at a time (bounded memory)."""
        for start in range(0, self._n, self.chunk_tokens):
            yield start, self.rows(layer_index, start, start + self.chunk_tokens)

    def index_select(self, dim: int, index: torch.Tensor) -> torch.Tensor:
        """Selected tokens of every layer, in memory (what ``Trace.select_tokens`` needs)."""
        if dim != 1:
            raise ValueError("lazy arrays select along tokens (dim=1) only")
        idx = np.asarray(index, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self._n):
            raise IndexError(f"token index out of range [0, {self._n})")
        return self._tensor(self._array.oindex[:, idx, :])

    def to_dask(self):
        """A dask array ``[layers, tokens, features]`` over the store's chunks."""
        import dask.array as da

        return da.from_zarr(self._array)[:, : self._n, :]

    def load(self) -> torch.Tensor:
        """The whole array in memory."""
        return self._tensor(self._array[:, : self._n, :])

    def contiguous(self) -> torch.Tensor:
        return self.load()

    def __repr__(self) -> str:
        return f"LazyArray(shape={tuple(self.shape)}, dtype={self.dtype}, chunk_tokens={self.chunk_tokens})"


class ZarrTrace(Trace):
    """A :class:`Trace` backed by a Zarr store (``sl.Trace.open``): arrays stay on disk.

    ``arrays`` maps names to :class:`LazyArray`; ``activations(layer)`` and the other
    per-layer readers load one layer; token metadata is in memory. ``progress`` says how
    much of the run the store holds (``complete``, ``passages``).
    """

    path: Path | None = None
    progress: dict[str, Any] | None = None

    def stored_masks(self):
        """The packed masks recorded with ``masks=`` as :class:`sparselab.Masks`, or None."""
        from sparselab.masking.masks import Masks

        rule = self.meta.get("masks_rule")
        if not rule:
            return None
        import zarr

        bits = zarr.open_group(str(self.path), mode="r")["masks/bits"][:, : self.n_tokens, :]
        return Masks(bits=bits, n_neurons=int(self.meta["intermediate_size"]), layers=self.layers,
                     seq_ids=self.seq_ids, positions=self.positions, rule=rule)

    def to_memory(self) -> Trace:
        """The whole recording as an in-memory :class:`Trace`."""
        return Trace(layers=self.layers, arrays={k: v.load() for k, v in self.arrays.items()},
                     pieces=self.pieces, meta=dict(self.meta),
                     **{f: getattr(self, f) for f in TOKEN_FIELDS})

    def save(self, path: str | os.PathLike) -> Path:
        """Copy to another store (``*.zarr``) or write a ``.trace`` file (loads it in memory)."""
        return convert(self.path, path)

    def __repr__(self) -> str:
        done = "" if (self.progress or {}).get("complete") else ", incomplete"
        return super().__repr__()[:-1] + f", store={str(self.path)!r}{done})"


def open_trace(path: str | os.PathLike) -> ZarrTrace:
    """Open a store written by ``record(..., out=)`` lazily (an interrupted one too)."""
    import zarr

    path = Path(path)
    header, progress = _read_attrs(path)
    group = zarr.open_group(str(path), mode="r")
    n = int(progress["n_tokens"])
    fields = {f: np.asarray(group[f"tokens/{f}"][:n]) for f in TOKEN_FIELDS}
    arrays = {k: LazyArray(group[f"arrays/{k}"], n) for k in header["arrays"]}
    meta = dict(header["meta"])
    meta["masks_rule"] = header.get("masks_rule")
    meta.setdefault("intermediate_size", header.get("n_neurons"))
    pieces = None
    if "pieces" in group:
        pieces = [str(s) for s in group["pieces"][:n]]
    trace = ZarrTrace(layers=tuple(header["layers"]), arrays=arrays, pieces=pieces, meta=meta, **fields)
    trace.path, trace.progress = path, progress
    return trace


def write_zarr(trace: Trace, path: str | os.PathLike, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
               compression: str | None = None) -> Path:
    """Write an in-memory trace as a complete store (``trace.save("x.zarr")``)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial-write")
    if tmp.exists():
        shutil.rmtree(tmp)
    arrays = {k: (int(v.shape[2]), v.dtype) for k, v in trace.arrays.items()}
    meta = dict(trace.meta)
    meta.pop("masks_rule", None)
    writer = ZarrWriter.create(tmp, trace.layers, arrays, config=dict(trace.meta.get("record", {})),
                               meta=meta, chunk_tokens=chunk_tokens, compression=compression,
                               n_neurons=trace.n_neurons, pieces=trace.pieces is not None)
    for start in range(0, trace.n_tokens, chunk_tokens):
        stop = min(start + chunk_tokens, trace.n_tokens)
        fields = {f: getattr(trace, f)[start:stop] for f in TOKEN_FIELDS}
        buffers = {(k, layer): trace.arrays[k][j, start:stop]
                   for k in trace.arrays for j, layer in enumerate(trace.layers)}
        writer.append(fields, buffers, None if trace.pieces is None else trace.pieces[start:stop])
    writer.commit(n_seqs=trace.n_sequences, complete=True)
    writer.close()
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    return path


def convert(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Convert between formats by the paths' kinds: ``.zarr`` store <-> ``.trace`` file.

        >>> convert("run.zarr", "run.trace"); convert("run.trace", "copy.zarr")
    """
    from sparselab.recording.trace_file import load_trace, save_trace

    source = open_trace(src) if is_zarr_path(src) else load_trace(src)
    if is_zarr_path(dst):
        if isinstance(source, ZarrTrace):
            source = source.to_memory()
        return write_zarr(source, dst)
    if isinstance(source, ZarrTrace):
        source = source.to_memory()
    return save_trace(source, dst)
