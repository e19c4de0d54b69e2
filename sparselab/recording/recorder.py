"""Record what every gated MLP does, token by token, with hooks that always come off.

    >>> with sl.Recorder(model, tokenizer=tokenizer) as rec:
    ...     model.generate(**batch, max_new_tokens=32)
    >>> trace = rec.trace                      # prefill tokens and each decode step, marked

    >>> trace = sl.record(model, tokenizer, texts, max_length=256)   # padded batches

Hooks: a pre-hook on the whole model reads the call's ``input_ids``, ``attention_mask``
and KV-cache length (to drop pad tokens and to tell prefill from decode); per layer, the
MLP's input (post-norm), the gate projection's output (act(gate) is applied here), the
down projection's input (exactly ``act(gate) * up`` as the model computed it) and the
layer's input norm. A post-hook on the model keeps only the attended tokens.

On a model sparsified with ``sl.sparsify`` (enter the Recorder after it), each sparse MLP
hands the recorder what it really computed (:meth:`SparseMLP.observe
<sparselab.runtime.SparseMLP.observe>`): ``h`` and ``gate`` of the neurons it computed, 0
elsewhere, and the set itself, kept as the trace's ``computed`` array (packed bits) with
the sparsify options in ``meta["sparse"]``; so a live sparse generation is analysed like a
dense recording::

    >>> with sl.sparsify(model, predictors) as handle, sl.Recorder(model) as rec:
    ...     model.generate(**batch, max_new_tokens=16)
    >>> rec.trace.computed(3).float().mean()         # the density layer 3 really ran at
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from sparselab._checks import check_int
from sparselab._heap import trim_heap
from sparselab.models import adapter_for, model_identity
from sparselab.recording.trace import ARRAYS, COMPUTED, Trace

__all__ = ["Recorder", "record"]


class _CallState:
    """Token bookkeeping for one forward pass of the model."""

    def __init__(self, valid: torch.Tensor, token_ids, seq_ids, positions, step: int, prefill: bool):
        self.valid = valid  # bool [B, S]
        self.flat_index = torch.nonzero(valid.reshape(-1)).squeeze(1)
        self.token_ids = token_ids  # int64 [B, S]
        self.seq_ids = seq_ids  # int64 [B]
        self.positions = positions  # int64 [B, S]
        self.step = step
        self.prefill = prefill
        self.buffers: dict[tuple[str, int], torch.Tensor] = {}


def _past_length(kwargs: dict[str, Any]) -> int:
    cache_position = kwargs.get("cache_position")
    if cache_position is not None and cache_position.numel():
        return int(cache_position.reshape(-1)[0])
    # the KV cache is passed as `past_key_values` (transformers 4) or `cache` (5)
    past = kwargs.get("past_key_values", kwargs.get("cache"))
    if past is None:
        return 0
    if hasattr(past, "get_seq_length"):
        return int(past.get_seq_length())
    return int(past[0][0].shape[-2]) if len(past) else 0


STORAGE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_recording(n_layers: int, layers, store, dtype, input_dtype=torch.float32
                    ) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """``(layers, store)`` checked for a model of ``n_layers`` layers, else ``ValueError``.

        >>> check_recording(30, None, "h", torch.float16)        # (0, ..., 29), ("h",)

    One array name may be given as a string (``store="gate"``); ``layers=None`` means all.
    """
    for name, dt in (("dtype", dtype), ("input_dtype", input_dtype)):
        if dt not in STORAGE_DTYPES:
            raise ValueError(f"{name} must be torch.float16, torch.bfloat16 or torch.float32 "
                             f"(recorded activations are floats), got {dt!r}")
    if layers is None:
        chosen = tuple(range(n_layers))
    else:
        if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__"):
            raise ValueError(f"layers must be a list of layer numbers or None, got {layers!r}")
        chosen = tuple(layers)
        if not chosen:
            raise ValueError("layers is empty: pass layer numbers, or None to record all layers")
        if any(isinstance(i, bool) or not isinstance(i, (int, np.integer)) for i in chosen):
            raise ValueError(f"layers must be integers, got {list(chosen)}")
        chosen = tuple(int(i) for i in chosen)
    if any(not 0 <= i < n_layers for i in chosen) or len(set(chosen)) != len(chosen):
        raise ValueError(f"layers must be distinct numbers in [0, {n_layers}), got {list(chosen)}")
    names = (store,) if isinstance(store, str) else tuple(store)
    unknown = sorted({str(a) for a in names} - set(ARRAYS))
    if unknown:
        raise ValueError(f"unknown arrays {unknown}; choose from {ARRAYS}")
    return chosen, names


def _sparse_wrappers(adapter, layers: Sequence[int]) -> dict[int, nn.Module]:
    """Layer -> sparse MLP wrapper (``sl.sparsify``) among ``layers``."""
    mlps = {i: adapter.layers[i].mlp for i in layers}
    return {i: m for i, m in mlps.items()
            if getattr(m, "is_sparselab_wrapper", False) and hasattr(m, "observe")}


def _sparse_meta(wrappers: dict[int, nn.Module]) -> dict[str, Any] | None:
    """JSON-able sparsify options of the recorded sparse layers (``meta["sparse"]``), or
    None for a dense recording."""
    if not wrappers:
        return None
    rt = next(iter(wrappers.values())).rt
    meta = dict(rt.config)
    meta["recorded_layers"] = sorted(wrappers)
    policy = getattr(rt.predictors, "policy", None)
    if hasattr(policy, "describe"):
        meta["policy"] = policy.describe()
    return json.loads(json.dumps(meta, default=str))


class Recorder:
    """Context manager that records MLP activations of ``model`` while it runs.

        >>> with sl.Recorder(model, tokenizer=tokenizer, layers=[0, 5]) as rec:
        ...     model(**batch)
        >>> rec.trace.activations(5).shape

    ``layers``: layer numbers to record (default all). ``store``: which arrays to keep,
    any of ``("h", "gate", "mlp_in", "layer_in")``. ``dtype`` is the storage dtype of
    ``h`` and ``gate`` (fp16 halves the memory), ``input_dtype`` that of the inputs.
    Hooks are removed on exit, also when the body raises.

    On a sparsified model (``sl.sparsify``; create and enter the Recorder while it is
    sparsified) the sparse layers record what they computed: ``h``/``gate`` 0 outside the
    computed neurons, which the trace's ``computed`` array marks (see :mod:`.trace`).
    Sparsifying or restoring the model while the Recorder is attached is a
    ``RuntimeError`` at the next forward call (the recording so far is kept).

    ``out="run.zarr"`` streams every forward pass to a new Zarr store instead of keeping
    it in memory (:mod:`.zarr_store`; ``chunk_tokens``, ``compression`` set its chunks and
    codec, ``masks=`` a fitted rule whose packed masks are stored too, ``store=()`` for
    masks only); ``rec.trace`` is then the lazy ``Trace.open(out)``. Streamed tokens keep
    the order the model computed them in (for ``record``: sequence, then position).
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[int] | None = None,
        store: Iterable[str] = ARRAYS,
        dtype: torch.dtype = torch.float16,
        input_dtype: torch.dtype = torch.float32,
        tokenizer=None,
        out=None,
        chunk_tokens: int | None = None,
        compression: str | None = None,
        masks=None,
    ) -> None:
        self.model = model
        self.adapter = adapter_for(model)
        self.layers, self.store = check_recording(self.adapter.n_layers, layers, store, dtype,
                                                  input_dtype)
        self._find_mlps()
        self.dtype, self.input_dtype, self.tokenizer = dtype, input_dtype, tokenizer
        self._hooked = self.store
        if masks is None and hasattr(out, "append"):  # an open store keeps its own rule
            masks = out._rule
        if masks is not None:
            from sparselab.masking.rules import Rule

            if out is None:
                raise ValueError("masks= is for streamed recordings: pass out= too")
            if not isinstance(masks, Rule) or not masks.fitted:
                raise ValueError("masks= must be a fitted sparselab.rules rule (call .fit(trace))")
            if masks.source not in self.store:  # hooked to compute the masks, not stored
                self._hooked = (*self.store, masks.source)
        if not self._hooked:
            raise ValueError("store is empty and no masks= rule: nothing would be recorded")
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._chunks: list[dict[str, Any]] = []
        self._call: _CallState | None = None
        self._row_seq: torch.Tensor | None = None
        self._step = 0
        self._next_seq = 0
        self._trace: Trace | None = None
        self._started = time.time()
        self._writer = None
        if out is not None:
            self._writer = out if hasattr(out, "append") else self._create_store(
                out, chunk_tokens, compression, masks)

    # -- sparse layers ------------------------------------------------------------------
    def _find_mlps(self) -> None:
        """The MLP module of every recorded layer now, and which are sparse wrappers."""
        self._mlps = {i: self.adapter.layers[i].mlp for i in self.layers}
        self._sparse = _sparse_wrappers(self.adapter, self.layers)

    def _replaced_mlps(self) -> list[int]:
        """Recorded layers whose MLP module is no longer the one the hooks are on."""
        return [i for i, mlp in self._mlps.items()
                if getattr(self.adapter.layers[i].layer, self.adapter.layers[i].attr) is not mlp]

    @property
    def sparse(self) -> bool:
        """Whether any recorded layer runs a sparse MLP (the trace then holds ``computed``).

            >>> with sl.sparsify(model, predictors): sl.Recorder(model).sparse     # True
        """
        return bool(self._sparse)

    def _sparse_meta(self) -> dict[str, Any] | None:
        return _sparse_meta(self._sparse)

    def _kept_arrays(self) -> tuple[str, ...]:
        return (*self.store, COMPUTED) if self._sparse else self.store

    # -- context management -------------------------------------------------------------
    def __enter__(self) -> Recorder:
        if self._handles:
            raise RuntimeError("this Recorder is already active")
        self.adapter = adapter_for(self.model)
        if self._replaced_mlps():
            if self._writer is not None or self._chunks:
                raise RuntimeError(
                    f"the MLPs of layers {self._replaced_mlps()} changed (sparsified or restored) "
                    "since this Recorder was created or last used: its recording would mix "
                    "dense and sparse calls; use a new Recorder")
            self._find_mlps()
        try:
            self._attach()
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
        self._call = None
        if self._writer is not None:  # every streamed batch on disk before the block ends
            self._writer.close()

    def remove(self) -> None:
        """Remove every hook this recorder registered (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @property
    def active(self) -> bool:
        return bool(self._handles)

    # -- hooks --------------------------------------------------------------------------
    def _attach(self) -> None:
        reg = self._handles.append
        reg(self.model.register_forward_pre_hook(self._on_call_start, with_kwargs=True))
        reg(self.model.register_forward_hook(self._on_call_end))
        for i in self.layers:
            mlp = self.adapter.layers[i]
            if "mlp_in" in self._hooked:
                reg(mlp.mlp.register_forward_pre_hook(self._saver("mlp_in", i, from_input=True)))
            if i in self._sparse:  # the sparse MLP says what it computed (h, gate, the set)
                reg(mlp.mlp.observe(self._sparse_saver(i)))
            else:
                if "gate" in self._hooked:
                    reg(mlp.gate_proj.register_forward_hook(self._gate_saver(i)))
                if "h" in self._hooked:
                    reg(mlp.down_proj.register_forward_pre_hook(self._saver("h", i, from_input=True)))
            if "layer_in" in self._hooked:
                if mlp.input_norm is not None:
                    reg(mlp.input_norm.register_forward_hook(self._saver("layer_in", i)))
                else:  # no input norm (OLMo 2): the decoder layer's input itself
                    reg(mlp.layer.register_forward_pre_hook(self._layer_input_saver(i), with_kwargs=True))

    def _on_call_start(self, module, args, kwargs) -> None:
        replaced = self._replaced_mlps()
        if replaced:
            raise RuntimeError(
                f"the MLPs of layers {replaced} were replaced while the Recorder was attached "
                "(sl.sparsify or handle.restore inside the `with Recorder` block): its hooks are "
                "on the old modules. Enter the Recorder inside the sparsify block (or after "
                "restore); what was recorded so far is kept in rec.trace")
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        ref = input_ids if input_ids is not None else embeds
        if ref is None:
            self._call = None
            return
        batch, length = ref.shape[0], ref.shape[1]
        past = _past_length(kwargs)
        attn = kwargs.get("attention_mask")
        if attn is not None and attn.dim() == 2:
            attn = attn.to(torch.bool)
            valid = attn[:, -length:]
            positions = (attn.long().cumsum(-1) - 1)[:, -length:]
        else:
            valid = torch.ones(batch, length, dtype=torch.bool)
            positions = past + torch.arange(length).expand(batch, length)
        prefill = past == 0
        if prefill or self._row_seq is None or len(self._row_seq) != batch:
            self._row_seq = torch.arange(self._next_seq, self._next_seq + batch)
            self._next_seq += batch
            self._step = 0
        else:
            self._step += 1
        ids = input_ids if input_ids is not None else torch.full((batch, length), -1)
        self._call = _CallState(
            valid.cpu(), ids.long().cpu(), self._row_seq.clone(), positions.long().cpu(),
            self._step, prefill,
        )

    def _current_call(self, tensor: torch.Tensor) -> _CallState:
        call = self._call
        if call is None:  # a submodule called outside a full-model forward: all tokens valid
            b, s = tensor.shape[0], tensor.shape[1]
            self._call = call = _CallState(
                torch.ones(b, s, dtype=torch.bool), torch.full((b, s), -1),
                torch.arange(self._next_seq, self._next_seq + b), torch.arange(s).expand(b, s),
                0, True,
            )
            self._next_seq += b
        return call

    def _keep(self, name: str, layer: int, tensor: torch.Tensor) -> None:
        call = self._current_call(tensor)
        dtype = self.input_dtype if name in ("mlp_in", "layer_in") else self.dtype
        flat = tensor.detach().reshape(-1, tensor.shape[-1])
        call.buffers[(name, layer)] = flat.index_select(0, call.flat_index.to(flat.device)).to(
            device="cpu", dtype=dtype
        )

    def _keep_computed(self, layer: int, computed: torch.Tensor) -> None:
        """The attended tokens' computed sets as packed bits (int64 view of uint64 words)."""
        from sparselab._fast.masks import pack

        call = self._current_call(computed)
        flat = computed.reshape(-1, computed.shape[-1])
        rows = flat.index_select(0, call.flat_index.to(flat.device)).cpu().numpy()
        call.buffers[(COMPUTED, layer)] = torch.from_numpy(pack(rows).view(np.int64))

    def _sparse_saver(self, layer: int):
        def observer(call) -> None:  # a sparselab.runtime.SparseCall
            if "h" in self._hooked:
                self._keep("h", layer, call.h)
            if "gate" in self._hooked:
                self._keep("gate", layer, call.gate)
            self._keep_computed(layer, call.computed)

        return observer

    def _saver(self, name: str, layer: int, from_input: bool = False):
        def hook(module, inputs, output=None):
            self._keep(name, layer, inputs[0] if from_input else output)

        if from_input:
            return lambda module, inputs: hook(module, inputs)
        return hook

    def _layer_input_saver(self, layer: int):
        def hook(module, args, kwargs):
            self._keep("layer_in", layer, args[0] if args else kwargs["hidden_states"])

        return hook

    def _gate_saver(self, layer: int):
        mlp, act = self.adapter.layers[layer], self.adapter.act_fn

        def hook(module, inputs, output):
            self._keep("gate", layer, act(mlp.split_gate_output(output)))

        return hook

    def _on_call_end(self, module, args, output) -> None:
        call, self._call = self._call, None
        if call is None or not call.buffers:
            return
        self._check_complete(call)
        self._commit(call)

    def _check_complete(self, call: _CallState) -> None:
        """Every recorded layer gave every kept array (dense layers of a sparse recording
        get an all-True ``computed``), else a clear ``RuntimeError``; the call is dropped."""
        if self._sparse:
            from sparselab._fast.masks import pack

            rows = len(call.flat_index)
            full = None
            for i in self.layers:
                if i not in self._sparse:
                    if full is None:
                        full = torch.from_numpy(
                            pack(np.ones((rows, self.adapter.n_neurons), dtype=bool)).view(np.int64))
                    call.buffers[(COMPUTED, i)] = full
        names = (*self._hooked, COMPUTED) if self._sparse else self._hooked
        missing = [(name, i) for i in self.layers for name in names if (name, i) not in call.buffers]
        if missing:
            raise RuntimeError(
                f"this forward pass recorded nothing for {missing[:4]}"
                f"{' ...' if len(missing) > 4 else ''}: the hooked modules did not run (was "
                "the model changed while the Recorder was attached?); the call was dropped, "
                "earlier calls are kept in rec.trace")

    def _commit(self, call: _CallState) -> None:
        idx = call.flat_index
        b, s = call.valid.shape
        chunk = {
            "token_ids": call.token_ids.reshape(-1)[idx].numpy(),
            "seq_ids": call.seq_ids[:, None].expand(b, s).reshape(-1)[idx].numpy(),
            "positions": call.positions.reshape(-1)[idx].numpy(),
            "steps": np.full(len(idx), call.step),
            "is_prefill": np.full(len(idx), call.prefill),
            "buffers": call.buffers,
        }
        self._trace = None
        if self._writer is None:
            self._chunks.append(chunk)
            return
        pieces = None
        if self._writer.pieces is not None:
            pieces = self.tokenizer.batch_decode([[int(t)] for t in chunk["token_ids"]])
        self._writer.append(chunk, call.buffers, pieces)  # written on the store's thread
        call.buffers.clear()
        if self.auto_commit:  # record() commits once per batch, with the passages it held
            self._writer.commit()

    auto_commit = True

    def _create_store(self, out, chunk_tokens, compression, masks):
        from sparselab.recording.zarr_store import DEFAULT_CHUNK_TOKENS, ZarrWriter

        hidden = int(self.model.config.get_text_config().hidden_size)
        n = self.adapter.n_neurons
        arrays = {
            name: (hidden if name in ("mlp_in", "layer_in") else n,
                   self.input_dtype if name in ("mlp_in", "layer_in") else self.dtype)
            for name in self.store
        }
        if self._sparse:  # packed bits: one int64 word per 64 neurons
            from sparselab._fast.masks import n_words

            arrays[COMPUTED] = (n_words(n), torch.int64)
        return ZarrWriter.create(
            out, self.layers, arrays, config=self.store_config(), meta=self._meta(),
            chunk_tokens=chunk_tokens or DEFAULT_CHUNK_TOKENS, compression=compression,
            masks_rule=masks, n_neurons=n, pieces=self.tokenizer is not None,
        )

    def store_config(self) -> dict[str, Any]:
        """What a resumed store must share with this recorder (checked on resume)."""
        return {"layers": list(self.layers), "store": list(self.store),
                "dtype": str(self.dtype).replace("torch.", ""),
                "input_dtype": str(self.input_dtype).replace("torch.", ""),
                "sparse": self._sparse_meta()}


    # -- result -------------------------------------------------------------------------
    @property
    def trace(self) -> Trace:
        """The recording so far as a :class:`Trace`, tokens ordered by sequence and position."""
        if self._call is not None and self._call.buffers and not self.active:
            # hooks fired without a whole-model forward (a submodule was called directly)
            self._commit(self._call)
            self._call = None
        if self._writer is not None:
            from sparselab.recording.zarr_store import open_trace

            self._writer.flush()
            return open_trace(self._writer.path)
        if self._trace is None:
            self._trace = self._build()
        return self._trace

    def take_trace(self) -> Trace:
        """The recording as a :class:`Trace`, releasing the recorder's own copy as it is built.

            >>> trace = rec.take_trace()       # after the ``with`` block; peak ~1x, not 2x

        For long recordings: each chunk's buffers are freed once copied into the trace, so
        memory peaks near the size of the trace instead of twice it. The recorder is empty
        afterwards (``rec.trace`` raises until it records again).
        """
        if self.active:
            raise RuntimeError("take_trace() needs the recording to be finished (leave the with block)")
        if self._writer is not None:
            return self.trace
        trace = self.trace if self._trace is not None else self._build(release=True)
        self._chunks, self._trace = [], None
        return trace

    def _build(self, release: bool = False) -> Trace:
        if not self._chunks:
            raise RuntimeError("nothing was recorded: run the model inside `with Recorder(...)`")
        fields = {
            key: np.concatenate([c[key] for c in self._chunks])
            for key in ("token_ids", "seq_ids", "positions", "steps", "is_prefill")
        }
        # order by sequence, then position (decode steps of a sequence come after its prompt)
        order = np.lexsort((fields["steps"], fields["positions"], fields["seq_ids"]))
        # where each recorded row goes: rows are copied once, chunk by chunk, into the final
        # array (a cat + stack would hold up to three copies of a recording at its peak)
        destination = np.empty_like(order)
        destination[order] = np.arange(len(order))
        starts = np.cumsum([0] + [len(c["token_ids"]) for c in self._chunks])
        rows = [torch.from_numpy(destination[a:b]) for a, b in zip(starts[:-1], starts[1:], strict=True)]
        arrays = {}
        for name in self._kept_arrays():
            first = self._chunks[0]["buffers"][(name, self.layers[0])]
            out = torch.empty((len(self.layers), len(order), first.shape[1]), dtype=first.dtype)
            for j, i in enumerate(self.layers):
                for chunk, where in zip(self._chunks, rows, strict=True):
                    out[j].index_copy_(0, where, chunk["buffers"][(name, i)])
                    if release:
                        del chunk["buffers"][(name, i)]
                if release:  # per layer: the next layer's rows reuse these pages
                    trim_heap()
            arrays[name] = out
        fields = {k: v[order] for k, v in fields.items()}
        pieces = None
        if self.tokenizer is not None:
            pieces = self.tokenizer.batch_decode([[int(t)] for t in fields["token_ids"]])
        return Trace(layers=self.layers, arrays=arrays, pieces=pieces, meta=self._meta(), **fields)

    def _meta(self) -> dict[str, Any]:
        from sparselab._version import versions
        from sparselab.models.fingerprint import mlp_fingerprint

        meta = {
            "model": model_identity(self.model),
            "model_check": _model_check(self.model),
            # rounding-tolerant: predictors trained on this trace keep it (Predictors.load checks)
            "mlp_fingerprint": mlp_fingerprint(self.model),
            "activation": self.adapter.activation,
            "store_dtype": str(self.dtype).replace("torch.", ""),
            "input_dtype": str(self.input_dtype).replace("torch.", ""),
            "hidden_size": int(self.model.config.get_text_config().hidden_size),
            "intermediate_size": self.adapter.n_neurons,
            "versions": versions(),
            "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(self._started)),
        }
        if self._sparse:
            meta["sparse"] = self._sparse_meta()
        return meta


class RecordingTooLarge(MemoryError):
    """An in-memory recording that would not fit in the available memory (nothing was run)."""


def estimate_trace_bytes(model: nn.Module, n_tokens: int, layers: Sequence[int] | None = None,
                         store: Iterable[str] = ARRAYS, dtype: torch.dtype = torch.float16,
                         input_dtype: torch.dtype = torch.float32) -> int:
    """Bytes an in-memory trace of ``n_tokens`` tokens takes (the arrays; metadata is ~40 B/token).

        >>> estimate_trace_bytes(model, 2048) / 2**30      # GiB for 2,048 tokens of SmolLM2
    """
    from sparselab._fast.masks import n_words

    adapter = adapter_for(model)
    chosen = tuple(range(adapter.n_layers)) if layers is None else tuple(layers)
    hidden = int(model.config.get_text_config().hidden_size)
    per_layer = 0
    for name in store:
        features = hidden if name in ("mlp_in", "layer_in") else adapter.n_neurons
        itemsize = (input_dtype if name in ("mlp_in", "layer_in") else dtype).itemsize
        per_layer += features * itemsize
    if _sparse_wrappers(adapter, chosen):  # a sparse model's trace: the packed computed sets
        per_layer += 8 * n_words(adapter.n_neurons)
    return int(n_tokens) * (len(chosen) * per_layer + 41)


def _count_tokens(tokenizer, texts: Sequence[str], max_length: int) -> int:
    lengths = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    return sum(len(x) for x in lengths)


def record(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    max_length: int = 256,
    batch_size: int = 8,
    layers: Sequence[int] | None = None,
    store: Iterable[str] = ARRAYS,
    dtype: torch.dtype = torch.float16,
    progress: bool = True,
    *,
    out=None,
    resume: bool = False,
    chunk_tokens: int | None = None,
    compression: str | None = None,
    masks=None,
    check_memory: bool = True,
) -> Trace:
    """Run ``model`` over ``texts`` (padded batches, no KV cache) and record every token.

        >>> trace = sl.record(model, tokenizer, sl.load_corpus(n=16), max_length=128)
        >>> trace = sl.record(model, tokenizer, texts, out="run.zarr")           # on disk
        >>> trace = sl.record(model, tokenizer, texts, out="run.zarr", resume=True)

    Each text is truncated to ``max_length`` tokens; pad tokens are not recorded.

    ``out``: stream to a Zarr store (see :mod:`.zarr_store`; memory bounded by one batch)
    and return the lazy ``Trace.open(out)``; each batch is committed with the digests of
    its passages. ``resume=True`` continues an existing store after its last committed
    batch (same model, config and leading texts, else :class:`StoreMismatch` before any
    work); a complete store is returned as is. In memory (no ``out``), the trace's size
    is estimated first and :class:`RecordingTooLarge` raised if it exceeds the available
    memory (``check_memory=False`` skips the check).
    """
    if isinstance(texts, str):
        raise TypeError("texts must be a list of strings, not one string")
    if not texts:
        raise ValueError("texts is empty")
    empty = [i for i, t in enumerate(texts) if not isinstance(t, str) or not t.strip()]
    if empty:
        raise ValueError(f"texts must be non-empty strings: texts{empty[:5]} "
                         f"{'is' if len(empty) == 1 else 'are'} empty or not a string")
    max_length = check_int("max_length", max_length, low=1)
    batch_size = check_int("batch_size", batch_size, low=1)
    if resume and out is None:
        raise ValueError("resume=True needs out= (the store to continue)")
    layers, store = check_recording(adapter_for(model).n_layers, layers, store, dtype)
    device = next(model.parameters()).device
    # the caller's tokenizer comes back unchanged: pad token and padding side are restored
    pad_token = tokenizer.pad_token
    if pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has neither a pad nor an EOS token to pad batches with")
        tokenizer.pad_token = tokenizer.eos_token
    try:
        return _record_checked(model, tokenizer, texts, max_length, batch_size, layers, store,
                               dtype, progress, device, out, resume, chunk_tokens, compression,
                               masks, check_memory)
    finally:
        if pad_token is None:
            tokenizer.pad_token = None


def _record_checked(model, tokenizer, texts, max_length, batch_size, layers, store, dtype,
                    progress, device, out, resume, chunk_tokens, compression, masks,
                    check_memory) -> Trace:
    """:func:`record` after its arguments were checked and a pad token set."""
    from tqdm.auto import tqdm

    if out is None and check_memory:
        import psutil

        need = estimate_trace_bytes(model, _count_tokens(tokenizer, texts, max_length), layers,
                                    store, dtype)
        available = psutil.virtual_memory().available
        if need > available:
            raise RecordingTooLarge(
                f"this recording needs ~{need / 2**30:.1f} GiB in memory but {available / 2**30:.1f} "
                f"GiB are available: stream it to disk with out='run.zarr' (sl.Trace.open reads it "
                f"lazily), or record fewer texts, layers or arrays (store=...)"
            )
    writer, start = None, 0
    if out is not None:
        writer, start = _open_writer(model, tokenizer, texts, out, resume, layers, store, dtype,
                                     max_length, batch_size, chunk_tokens, compression, masks)
        if writer is None:  # complete already
            from sparselab.recording.zarr_store import open_trace

            return open_trace(out)
    batches = range(start, len(texts), batch_size)
    # right padding for plain forwards, but the caller's tokenizer (often set to left
    # padding for generate) must come back unchanged
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "right"
    try:
        rec = Recorder(model, layers=layers, store=store, dtype=dtype, tokenizer=tokenizer,
                       out=writer)
        rec.auto_commit = False
        rec._next_seq = start
        with rec:
            with torch.no_grad():
                for first in tqdm(batches, desc="recording", unit="batch", disable=not progress,
                                  initial=start // batch_size, total=-(-len(texts) // batch_size)):
                    chunk = list(texts[first : first + batch_size])
                    batch = tokenizer(
                        chunk, return_tensors="pt",
                        padding=True, truncation=True, max_length=max_length,
                    ).to(device)
                    model(**batch, use_cache=False)
                    if writer is not None:
                        from sparselab.recording.zarr_store import text_digest

                        writer.commit(passages=[text_digest(t) for t in chunk],
                                      n_seqs=first + len(chunk))
        if writer is not None:
            writer.commit(complete=True)
    finally:
        tokenizer.padding_side = padding_side
        if writer is not None:  # interrupted or not: what was queued and committed lands
            writer.close()
    if writer is not None:
        from sparselab.recording.zarr_store import open_trace

        return open_trace(out)
    trace = rec.take_trace()
    trace.meta["record"] = {"max_length": max_length, "batch_size": batch_size, "n_texts": len(texts)}
    return trace


def _model_check(model: nn.Module) -> dict[str, Any]:
    """What a store's ``meta["model_check"]`` holds and a resume compares: the model's
    identity and an exact fingerprint of its weights."""
    from sparselab.models.fingerprint import weight_fingerprint

    return {"identity": model_identity(model), "weights": weight_fingerprint(model)}


def _open_writer(model, tokenizer, texts, out, resume, layers, store, dtype, max_length, batch_size,
                 chunk_tokens, compression, masks):
    """The store to write into and the first passage to record (checks before any work)."""
    from pathlib import Path

    from sparselab.recording.zarr_store import StoreMismatch, ZarrWriter, text_digest

    adapter = adapter_for(model)
    n = adapter.n_layers
    config = {"layers": list(range(n)) if layers is None else [int(i) for i in layers],
              "store": list(store), "dtype": str(dtype).replace("torch.", ""), "input_dtype": "float32"}
    config.update({"max_length": int(max_length), "batch_size": int(batch_size),
                   "masks_rule": None if masks is None else masks.describe(),
                   "sparse": _sparse_meta(_sparse_wrappers(adapter, config["layers"]))})
    path = Path(out)
    if path.exists() and resume:
        writer = ZarrWriter.resume(path, config, _model_check(model))
        done = list(writer.progress["passages"])
        if len(done) > len(texts):
            raise StoreMismatch(f"{path} holds {len(done)} passages, more than the {len(texts)} given")
        mismatch = [i for i, t in enumerate(texts[: len(done)]) if text_digest(t) != done[i]]
        if mismatch:
            raise StoreMismatch(f"{path} holds other texts (passage {mismatch[0]} differs): "
                                f"resume with the same texts, in the same order")
        if len(done) == len(texts) and writer.progress.get("complete"):
            return None, len(done)
        return writer, len(done)
    if path.exists():
        raise FileExistsError(f"{path} exists: pass resume=True to continue it, or remove it")
    rec = Recorder(model, layers=layers, store=store, dtype=dtype, tokenizer=tokenizer, out=out,
                   chunk_tokens=chunk_tokens, compression=compression, masks=masks)
    writer = rec._writer
    writer.header["config"] = config
    writer.group.attrs["sparselab"] = {**writer.group.attrs["sparselab"], "config": config}
    return writer, 0
