"""Timing one greedy generation, and the split of a decode step into its parts.

    >>> t = time_generate(model, ids, max_new_tokens=32)
    >>> t.ttft_s, t.decode_tokens_per_s
    >>> decode_split(t, handle.stats())          # ms per step: rest, MLP, predictor, kernel...
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import nn

from sparselab.models import decoder_layers, find_gated_mlp

# --------------------------------------------------------------------------------------
# timing one generate call
# --------------------------------------------------------------------------------------


@dataclass
class GenerationTiming:
    """Timings of one :func:`time_generate` call (seconds).

    ``token_s[i]``: from the call to the end of the forward that produced token ``i``;
    ``forward_s[i]``: duration of that forward; ``mlp_s[i]``: time inside the MLP modules
    during it (zeros when not measured). Forward 0 is the prefill.
    """

    n_prompt: int
    n_new: int
    batch_size: int
    total_s: float
    token_s: np.ndarray
    forward_s: np.ndarray
    mlp_s: np.ndarray
    output_ids: torch.Tensor | None = field(default=None, repr=False)

    @property
    def ttft_s(self) -> float:
        """Time to first token: the call to the end of the prefill forward."""
        return float(self.token_s[0])

    @property
    def decode_s(self) -> float:
        """Wall time of the decode steps (tokens 2..n), generate's own loop included."""
        return float(self.token_s[-1] - self.token_s[0])

    @property
    def decode_tokens_per_s(self) -> float:
        return self.batch_size * (self.n_new - 1) / self.decode_s

    @property
    def total_tokens_per_s(self) -> float:
        """New tokens per second of the whole call, prefill included."""
        return self.batch_size * self.n_new / self.total_s


def _mlp_modules(model: nn.Module) -> list[nn.Module]:
    """The modules each decoder layer calls as its MLP *now* (the dense MLP or a wrapper)."""
    return [find_gated_mlp(layer)[1] for layer in decoder_layers(model)]


def time_generate(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int,
                  attention_mask: torch.Tensor | None = None, pad_token_id: int | None = None,
                  mlp_split: bool = True) -> GenerationTiming:
    """Greedy ``model.generate`` of exactly ``max_new_tokens`` tokens with the KV cache, timed.

        >>> t = time_generate(model, ids, max_new_tokens=32)
        >>> t.ttft_s, t.decode_tokens_per_s, t.forward_s[1:].mean()

    ``min_new_tokens = max_new_tokens`` keeps EOS from stopping early. Forward hooks on the
    model time every forward; with ``mlp_split`` hooks on every decoder layer's MLP module
    also sum the time spent inside the MLPs (a few microseconds of overhead per layer).
    """
    if not isinstance(max_new_tokens, int) or max_new_tokens < 2:
        raise ValueError(f"max_new_tokens must be an int >= 2 (decode speed needs two tokens), "
                         f"got {max_new_tokens!r}")
    if input_ids.dim() != 2 or input_ids.shape[1] < 1:
        raise ValueError(f"input_ids must be [batch, prompt >= 1], got {tuple(input_ids.shape)}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if pad_token_id is None:
        pad_token_id = getattr(model.generation_config, "pad_token_id", None)
        if pad_token_id is None:
            pad_token_id = getattr(model.generation_config, "eos_token_id", None) or 0
        if isinstance(pad_token_id, (list, tuple)):
            pad_token_id = pad_token_id[0]
    clock = time.perf_counter_ns
    starts: list[int] = []
    ends: list[int] = []
    mlp_ns: list[int] = []
    mlp_t0 = [0]

    def pre(module, args):
        starts.append(clock())
        mlp_ns.append(0)

    def post(module, args, output):
        ends.append(clock())

    def mlp_pre(module, args):
        mlp_t0[0] = clock()

    def mlp_post(module, args, output):
        mlp_ns[-1] += clock() - mlp_t0[0]

    hooks = [model.register_forward_pre_hook(pre), model.register_forward_hook(post)]
    if mlp_split:
        for mlp in _mlp_modules(model):
            hooks += [mlp.register_forward_pre_hook(mlp_pre), mlp.register_forward_hook(mlp_post)]
    try:
        t0 = clock()
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                             num_beams=1, max_new_tokens=max_new_tokens,
                             min_new_tokens=max_new_tokens, use_cache=True,
                             pad_token_id=pad_token_id, temperature=None, top_p=None, top_k=None)
        t1 = clock()
    finally:
        for h in hooks:
            h.remove()
    n_new = out.shape[1] - input_ids.shape[1]
    if n_new != max_new_tokens or len(ends) != max_new_tokens:
        raise RuntimeError(f"generate produced {n_new} tokens in {len(ends)} forwards; expected "
                           f"{max_new_tokens} of each (is a stopping criterion set on the model?)")
    start, end = np.asarray(starts, dtype=np.int64), np.asarray(ends, dtype=np.int64)
    return GenerationTiming(
        n_prompt=int(input_ids.shape[1]), n_new=int(n_new), batch_size=int(input_ids.shape[0]),
        total_s=(t1 - t0) / 1e9, token_s=(end - t0) / 1e9, forward_s=(end - start) / 1e9,
        mlp_s=np.asarray(mlp_ns, dtype=np.float64) / 1e9, output_ids=out,
    )


# --------------------------------------------------------------------------------------
# per-component time split of the decode steps
# --------------------------------------------------------------------------------------

STAT_PARTS = (("t_predictor_ns", "predictor_ms"), ("t_mask_ns", "mask_ms"),
              ("t_cache_ns", "cache_ms"), ("t_mlp_ns", "kernel_ms"))


def decode_split(timing: GenerationTiming, stats: pd.DataFrame | None = None) -> dict[str, float]:
    """Mean milliseconds per decode step, by component (they add up to ``step_ms``).

        >>> decode_split(timing, handle.stats())
        {'step_ms': ..., 'rest_ms': ..., 'mlp_ms': ..., 'predictor_ms': ..., ...}

    - ``step_ms`` = ``forward_ms`` + ``generate_ms`` (generate's own loop between forwards);
    - ``forward_ms`` = ``mlp_ms`` (inside the MLP modules) + ``rest_ms`` (attention, norms,
      embedding, LM head);
    - with the sparse runtime's ``stats``: ``mlp_ms`` = ``predictor_ms`` + ``mask_ms`` +
      ``cache_ms`` (cache update) + ``kernel_ms`` (sparse MLP) + ``mlp_other_ms`` (the
      wrapper's Python, stats bookkeeping); plus ``active_density`` and per-step
      ``rows_copied`` / ``added`` (churn) summed over layers.
    """
    n = timing.n_new
    step = timing.decode_s / (n - 1) * 1e3
    fwd = float(timing.forward_s[1:].mean()) * 1e3
    mlp = float(timing.mlp_s[1:].mean()) * 1e3
    out = {"step_ms": step, "forward_ms": fwd, "generate_ms": step - fwd, "mlp_ms": mlp,
           "rest_ms": fwd - mlp}
    if stats is not None and len(stats):
        dec = stats[stats["phase"] == "decode"]
        steps = max(int(dec["step"].nunique()), 1)
        parts = 0.0
        for col, name in STAT_PARTS:
            out[name] = float(dec[col].sum()) / steps / 1e6
            parts += out[name]
        out["mlp_other_ms"] = mlp - parts
        out["active_density"] = float(dec["density"].mean()) if len(dec) else float("nan")
        out["rows_copied"] = float(dec["rows_copied"].sum()) / steps
        out["added"] = float(dec["added"].sum()) / steps
    return out
