"""How slowly the residual stream changes from layer to layer (Deja Vu's look-ahead premise).

    >>> cos = sl.studies.residual.residual_cosine(model, tokenizer, texts[:8], max_length=128)
    >>> sl.studies.residual.summarize_cosine(cos)[["layer", "mean"]]      # cos(x_in, x_out) per layer
    >>> sl.studies.residual.input_cosine(trace)                           # what a look-ahead predictor
    ...                                                           # reads vs what the MLP reads

Deja Vu (Liu et al., 2023) observes that a decoder layer changes the residual stream
little: the hidden state leaving layer ``l`` points almost the same way as the one
entering it. So the input of a layer, available before its attention runs, already says
much about the MLP's input - a predictor can run one step ahead, overlapped with
attention. :func:`residual_cosine` measures ``cos(x_l, x_{l+1})`` per token, with ``x_l``
the residual stream entering decoder layer ``l`` and ``x_{l+1}`` the one leaving it
(hooks on the decoder layers, not ``output_hidden_states``, whose last entry is usually
after the final norm). :func:`input_cosine` compares the two inputs a predictor of a
recorded trace can read: the layer's input-norm output (``layer_in``, before attention)
and the MLP's post-norm input (``mlp_in``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from sparselab.models import adapter_for, model_identity

__all__ = ["input_cosine", "residual_cosine", "summarize_cosine"]


def _layer_hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden-states argument of a decoder layer call (positional or keyword)."""
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    hidden = kwargs.get("hidden_states")
    if not isinstance(hidden, torch.Tensor):
        raise RuntimeError("decoder layer called without a hidden_states tensor")
    return hidden


def _layer_output(output) -> torch.Tensor:
    """Decoder layers return the new hidden states, alone or first in a tuple."""
    return output[0] if isinstance(output, (tuple, list)) else output


def residual_cosine(
    model,
    tokenizer,
    texts: Sequence[str],
    max_length: int = 128,
    batch_size: int = 8,
    layers: Sequence[int] | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Per token and layer, cosine similarity of the residual stream entering and leaving it.

        >>> df = residual_cosine(model, tokenizer, texts[:8], max_length=128)
        >>> df.groupby("layer").cosine.median()

    One forward pass per batch; texts are truncated to ``max_length`` tokens and padding
    is dropped. Columns: ``layer, seq_id, position, cosine`` (``seq_id`` = index of the
    text). ``df.attrs`` holds the config, model identity and versions.
    """
    from tqdm.auto import tqdm

    from sparselab._version import versions

    if isinstance(texts, str) or not texts or not all(isinstance(t, str) for t in texts):
        raise ValueError("texts must be a non-empty list of strings")
    if max_length < 1 or batch_size < 1:
        raise ValueError(f"max_length and batch_size must be >= 1, got {max_length}, {batch_size}")
    adapter = adapter_for(model)
    n_layers = len(adapter.layers)
    chosen = tuple(range(n_layers)) if layers is None else tuple(int(i) for i in layers)
    bad = [i for i in chosen if not 0 <= i < n_layers]
    if bad:
        raise ValueError(f"layers must be in [0, {n_layers}), got {bad}")

    cosines: dict[int, torch.Tensor] = {}
    inputs: dict[int, torch.Tensor] = {}

    def pre_hook(index: int):
        def hook(module, args, kwargs):
            inputs[index] = _layer_hidden(args, kwargs).detach()

        return hook

    def post_hook(index: int):
        def hook(module, args, kwargs, output):
            x_in, x_out = inputs.pop(index), _layer_output(output).detach()
            # float64: near-parallel vectors give cosines within 1e-7 of 1, where float32
            # rounding would blur the differences between layers
            cosines[index] = F.cosine_similarity(x_in.double(), x_out.double(), dim=-1)

        return hook

    side, pad = tokenizer.padding_side, tokenizer.pad_token
    handles = []
    rows = []
    try:
        for i in chosen:
            layer = adapter.layers[i].layer
            handles.append(layer.register_forward_pre_hook(pre_hook(i), with_kwargs=True))
            handles.append(layer.register_forward_hook(post_hook(i), with_kwargs=True))
        tokenizer.padding_side = "right"  # positions then equal column indices
        if pad is None:  # batching needs one; any token will do, padded positions are dropped
            tokenizer.pad_token = tokenizer.eos_token
        starts = range(0, len(texts), batch_size)
        device = next(model.parameters()).device
        for start in tqdm(starts, desc="residual cosine", unit="batch", disable=not progress):
            batch = tokenizer(list(texts[start:start + batch_size]), return_tensors="pt", padding=True,
                              truncation=True, max_length=max_length).to(device)
            with torch.no_grad():
                model(**batch, use_cache=False)
            valid = batch["attention_mask"].bool().cpu()
            rows_idx, cols_idx = torch.nonzero(valid, as_tuple=True)
            for i in chosen:
                values = cosines.pop(i).cpu()[rows_idx, cols_idx].numpy()
                rows.append(pd.DataFrame({"layer": i, "seq_id": rows_idx.numpy() + start,
                                          "position": cols_idx.numpy(), "cosine": values}))
    finally:
        for handle in handles:
            handle.remove()
        tokenizer.padding_side = side
        if pad is None:
            tokenizer.pad_token = None
    df = pd.concat(rows, ignore_index=True).sort_values(["layer", "seq_id", "position"], ignore_index=True)
    df.attrs["config"] = {"max_length": max_length, "n_texts": len(texts), "layers": list(chosen),
                          "what": "cos(residual entering layer l, residual leaving layer l)"}
    df.attrs["model"] = model_identity(model)
    df.attrs["versions"] = versions()
    return df


def input_cosine(trace) -> pd.DataFrame:
    """Per token and layer, cosine of the layer's input-norm output and the MLP's input.

        >>> input_cosine(trace).groupby("layer").cosine.mean()

    These are the two inputs a predictor of :func:`sparselab.prediction.train_predictors`
    can read (``lookahead=True``: ``layer_in``, before attention; default: ``mlp_in``).
    Both are normalised (with each norm's own gain), so this is the similarity the
    predictor actually sees. Columns: ``layer, seq_id, position, cosine``.
    """
    for name in ("layer_in", "mlp_in"):
        if name not in trace.arrays:
            raise KeyError(f"trace has no {name!r} array (recorded: {sorted(trace.arrays)}); "
                           f"record with store=(..., {name!r})")
    frames = []
    for layer in trace.layers:
        cos = F.cosine_similarity(trace.layer_inputs(layer).double(), trace.mlp_inputs(layer).double(), dim=-1)
        frames.append(pd.DataFrame({"layer": layer, "seq_id": trace.seq_ids, "position": trace.positions,
                                    "cosine": cos.numpy()}))
    df = pd.concat(frames, ignore_index=True)
    df.attrs["config"] = {"what": "cos(layer_in, mlp_in)", "n_tokens": trace.n_tokens}
    df.attrs["model"] = trace.meta.get("model", {})
    return df


def summarize_cosine(df: pd.DataFrame, min_position: int = 1) -> pd.DataFrame:
    """Per layer: mean, median and 10/90 % quantiles of the cosine, over tokens.

        >>> summarize_cosine(residual_cosine(model, tokenizer, texts))

    ``min_position``: tokens at earlier positions are left out - the first token of a text
    is an outlier in most models (an "attention sink" whose huge hidden state barely
    moves), so by default it does not inflate the averages. Columns: ``layer, mean, q10,
    median, q90, n_tokens``.
    """
    missing = [c for c in ("layer", "position", "cosine") if c not in df.columns]
    if missing:
        raise ValueError(f"summarize_cosine needs columns {missing}; got {list(df.columns)}")
    part = df[df.position >= min_position]
    if part.empty:
        raise ValueError(f"no tokens at positions >= {min_position}")
    out = part.groupby("layer").cosine.agg(
        mean="mean",
        q10=lambda s: float(np.quantile(s, 0.1)),
        median="median",
        q90=lambda s: float(np.quantile(s, 0.9)),
        n_tokens="size",
    ).reset_index()
    out.attrs = {**df.attrs, "min_position": min_position}
    return out
