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
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from sparselab._heap import trim_heap
from sparselab.models import adapter_for, model_identity
from sparselab.recording.trace import ARRAYS, Trace

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


class Recorder:
    """Context manager that records MLP activations of ``model`` while it runs.

        >>> with sl.Recorder(model, tokenizer=tokenizer, layers=[0, 5]) as rec:
        ...     model(**batch)
        >>> rec.trace.activations(5).shape

    ``layers``: layer numbers to record (default all). ``store``: which arrays to keep,
    any of ``("h", "gate", "mlp_in", "layer_in")``. ``dtype`` is the storage dtype of
    ``h`` and ``gate`` (fp16 halves the memory), ``input_dtype`` that of the inputs.
    Hooks are removed on exit, also when the body raises.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[int] | None = None,
        store: Iterable[str] = ARRAYS,
        dtype: torch.dtype = torch.float16,
        input_dtype: torch.dtype = torch.float32,
        tokenizer=None,
    ) -> None:
        self.model = model
        self.adapter = adapter_for(model)
        n = self.adapter.n_layers
        self.layers = tuple(range(n)) if layers is None else tuple(int(i) for i in layers)
        bad = [i for i in self.layers if not 0 <= i < n]
        if bad or len(set(self.layers)) != len(self.layers):
            raise ValueError(f"layers must be distinct numbers in [0, {n}), got {list(self.layers)}")
        self.store = tuple(store)
        unknown = set(self.store) - set(ARRAYS)
        if unknown:
            raise ValueError(f"unknown arrays {sorted(unknown)}; choose from {ARRAYS}")
        self.dtype, self.input_dtype, self.tokenizer = dtype, input_dtype, tokenizer
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._chunks: list[dict[str, Any]] = []
        self._call: _CallState | None = None
        self._row_seq: torch.Tensor | None = None
        self._step = 0
        self._next_seq = 0
        self._trace: Trace | None = None
        self._started = time.time()

    # -- context management -------------------------------------------------------------
    def __enter__(self) -> Recorder:
        if self._handles:
            raise RuntimeError("this Recorder is already active")
        try:
            self._attach()
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
        self._call = None

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
            if "mlp_in" in self.store:
                reg(mlp.mlp.register_forward_pre_hook(self._saver("mlp_in", i, from_input=True)))
            if "gate" in self.store:
                reg(mlp.gate_proj.register_forward_hook(self._gate_saver(i)))
            if "h" in self.store:
                reg(mlp.down_proj.register_forward_pre_hook(self._saver("h", i, from_input=True)))
            if "layer_in" in self.store:
                if mlp.input_norm is not None:
                    reg(mlp.input_norm.register_forward_hook(self._saver("layer_in", i)))
                else:  # no input norm (OLMo 2): the decoder layer's input itself
                    reg(mlp.layer.register_forward_pre_hook(self._layer_input_saver(i), with_kwargs=True))

    def _on_call_start(self, module, args, kwargs) -> None:
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

    def _keep(self, name: str, layer: int, tensor: torch.Tensor) -> None:
        call = self._call
        if call is None:  # a submodule called outside a full-model forward: all tokens valid
            b, s = tensor.shape[0], tensor.shape[1]
            self._call = call = _CallState(
                torch.ones(b, s, dtype=torch.bool), torch.full((b, s), -1),
                torch.arange(self._next_seq, self._next_seq + b), torch.arange(s).expand(b, s),
                0, True,
            )
            self._next_seq += b
        dtype = self.input_dtype if name in ("mlp_in", "layer_in") else self.dtype
        flat = tensor.detach().reshape(-1, tensor.shape[-1])
        call.buffers[(name, layer)] = flat.index_select(0, call.flat_index.to(flat.device)).to(
            device="cpu", dtype=dtype
        )

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
        self._commit(call)

    def _commit(self, call: _CallState) -> None:
        idx = call.flat_index
        b, s = call.valid.shape
        self._chunks.append(
            {
                "token_ids": call.token_ids.reshape(-1)[idx].numpy(),
                "seq_ids": call.seq_ids[:, None].expand(b, s).reshape(-1)[idx].numpy(),
                "positions": call.positions.reshape(-1)[idx].numpy(),
                "steps": np.full(len(idx), call.step),
                "is_prefill": np.full(len(idx), call.prefill),
                "buffers": call.buffers,
            }
        )
        self._trace = None

    # -- result -------------------------------------------------------------------------
    @property
    def trace(self) -> Trace:
        """The recording so far as a :class:`Trace`, tokens ordered by sequence and position."""
        if self._call is not None and self._call.buffers and not self.active:
            # hooks fired without a whole-model forward (a submodule was called directly)
            self._commit(self._call)
            self._call = None
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
        for name in self.store:
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

        return {
            "model": model_identity(self.model),
            "activation": self.adapter.activation,
            "store_dtype": str(self.dtype).replace("torch.", ""),
            "input_dtype": str(self.input_dtype).replace("torch.", ""),
            "hidden_size": int(self.model.config.get_text_config().hidden_size),
            "intermediate_size": self.adapter.n_neurons,
            "versions": versions(),
            "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(self._started)),
        }


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
) -> Trace:
    """Run ``model`` over ``texts`` (padded batches, no KV cache) and record every token.

        >>> trace = sl.record(model, tokenizer, sl.load_corpus(n=16), max_length=128)

    Each text is truncated to ``max_length`` tokens; pad tokens are not recorded.
    """
    from tqdm.auto import tqdm

    if isinstance(texts, str):
        raise TypeError("texts must be a list of strings, not one string")
    if not texts:
        raise ValueError("texts is empty")
    device = next(model.parameters()).device
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    batches = range(0, len(texts), batch_size)
    # right padding for plain forwards, but the caller's tokenizer (often set to left
    # padding for generate) must come back unchanged
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "right"
    try:
        with Recorder(model, layers=layers, store=store, dtype=dtype, tokenizer=tokenizer) as rec:
            with torch.no_grad():
                for start in tqdm(batches, desc="recording", unit="batch", disable=not progress):
                    batch = tokenizer(
                        list(texts[start : start + batch_size]), return_tensors="pt",
                        padding=True, truncation=True, max_length=max_length,
                    ).to(device)
                    model(**batch, use_cache=False)
    finally:
        tokenizer.padding_side = padding_side
    trace = rec.take_trace()
    trace.meta["record"] = {"max_length": max_length, "batch_size": batch_size, "n_texts": len(texts)}
    return trace
