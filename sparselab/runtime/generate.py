"""Generate from a prompt with the sparse model and keep what every decode step did.

    >>> result = sl.runtime.sparse_generate(model, tokenizer, "Explain list slicing.",
    ...                                  mode="oracle", density=0.3, max_new_tokens=16)
    >>> result.text, result.masks.layer(10).shape        # [decode steps, neurons]
    >>> sl.runtime.generate.time_split(result).head()                # ms per step and component

The model runs inside ``sl.sparsify(...)`` used as a context manager, so it is dense
again when :func:`sparse_generate` returns (also when generation raises). Decoding is
greedy, so the same prompt and settings give the same text.

What is kept per decode step (a forward call that feeds one generated token back):

- ``stats``: the runtime's own rows (:meth:`sparselab.SparseHandle.stats`), one per decode
  step and sparsified layer: active neurons, churn (added/removed), cache rows copied and
  bytes moved, nanoseconds in predictor / mask / cache update / MLP kernel;
- ``masks``: the neuron set every layer computed at that step, as :class:`sparselab.Masks`
  ``[layers, decode steps, neurons]`` (read from each sparse MLP right after its call);
- ``step_times``: wall time of every forward call of the whole model, so the time not
  spent in the MLPs (attention, norms, LM head) is visible too.

Decode step ``s`` (1-based, step 0 is the prompt) consumes generated token ``s - 1``:
``stats.piece`` and the heatmap rows name that token.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from sparselab._checks import check_choice, check_fraction
from sparselab.masking.masks import Masks
from sparselab.masking.rules import Rule, TopK
from sparselab.prediction.static import static_from_trace

__all__ = [
    "COMPONENTS",
    "LiveResult",
    "available_modes",
    "cache_traffic",
    "sparse_generate",
    "time_split",
]

# stats column -> name shown in the time split (the rest of a step's wall time is "other")
COMPONENTS = {
    "t_predictor_ns": "predictor",
    "t_mask_ns": "mask + union",
    "t_cache_ns": "cache update",
    "t_mlp_ns": "sparse MLP",
}
OTHER = "rest of the model"


@dataclass
class LiveResult:
    """What :func:`sparse_generate` returns (see the module docstring).

        >>> r = sparse_generate(model, tok, "Hello", mode="oracle", density=0.5)
        >>> r.text, len(r.tokens), r.stats.groupby("step").rows_copied.sum()

    ``text``: the generated continuation (prompt excluded); ``tokens``: its pieces, one
    per generated token; ``stats``: decode rows of the handle's stats plus ``token``
    (index of the generated token the step consumed) and ``piece``; ``prefill``: the
    prompt's rows; ``masks``: ``[layers, decode steps, neurons]``; ``step_times``: one row
    per forward call (``step``, ``phase``, ``wall_ns``); ``config``: the settings and
    library versions; ``dense_text``: the dense model's greedy continuation when asked for.
    """

    prompt: str
    text: str
    tokens: list[str]
    token_ids: np.ndarray
    stats: pd.DataFrame
    prefill: pd.DataFrame
    masks: Masks
    step_times: pd.DataFrame
    config: dict[str, Any] = field(default_factory=dict)
    dense_text: str | None = None

    @property
    def n_steps(self) -> int:
        """Number of decode steps (generated tokens fed back through the model)."""
        return int(self.masks.n_tokens)

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(self.masks.layers)

    def __repr__(self) -> str:
        c = self.config
        return (f"LiveResult(mode={c.get('mode')!r}, density={c.get('density')}, "
                f"{len(self.tokens)} tokens, {self.n_steps} decode steps x {len(self.layers)} layers)")


def available_modes(predictors=None, static_source=None) -> tuple[str, ...]:
    """Modes :func:`sparse_generate` can run with what is at hand.

        >>> available_modes()                     # ("oracle",)
        >>> available_modes(predictors, trace)    # ("oracle", "predicted", "static")
    """
    modes = ["oracle"]
    if predictors is not None:
        modes.append("predicted")
    if static_source is not None:
        modes.append("static")
    return tuple(modes)


def _prompt_ids(tokenizer, prompt: str, chat: bool) -> dict[str, torch.Tensor]:
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("chat=True but the tokenizer has no chat template; use chat=False")
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        return tokenizer(text, return_tensors="pt", add_special_tokens=False)
    return tokenizer(prompt, return_tensors="pt")


def _greedy(model, batch: Mapping[str, torch.Tensor], max_new_tokens: int, eos: int | None) -> torch.Tensor:
    """Greedy continuation ids ``[new]`` (the prompt is cut off)."""
    with torch.inference_mode():
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                             temperature=None, top_p=None, top_k=None, pad_token_id=eos)
    return out[0, batch["input_ids"].shape[1]:]


def _step_clock(model) -> tuple[list, list[tuple[int, int]]]:
    """Hooks timing every forward call of ``model``: (handles, [(start_ns, end_ns)])."""
    spans: list[tuple[int, int]] = []
    start: list[int] = []

    def pre(module, args, kwargs):
        start.append(time.perf_counter_ns())

    def post(module, args, kwargs, output):
        spans.append((start.pop(), time.perf_counter_ns()))

    handles = [model.register_forward_pre_hook(pre, with_kwargs=True),
               model.register_forward_hook(post, with_kwargs=True)]
    return handles, spans


def _mask_taps(handle) -> tuple[list, dict[int, list[np.ndarray]]]:
    """Forward hooks on every sparse MLP that keep the neuron set of each decode call.

    The wrapper remembers its last mask (for churn); right after a decode call that is the
    set it computed, so reading it costs one copy of N bools per layer and step.
    """
    taps: dict[int, list[np.ndarray]] = {layer: [] for layer in handle.wrappers}
    handles = []
    for layer, wrapper in handle.wrappers.items():
        if not hasattr(wrapper, "last_mask"):
            raise RuntimeError("this sparse runtime does not expose its masks (SparseMLP.last_mask)")

        def tap(module, args, output, _layer=layer):
            x = args[0]
            if x.dim() == 2 or x.shape[1] == 1:  # decode call: one token per row
                taps[_layer].append(module.last_mask.numpy().copy())

        handles.append(wrapper.register_forward_hook(tap))
    return handles, taps


def sparse_generate(
    model,
    tokenizer,
    prompt: str,
    mode: str = "oracle",
    density: float = 0.5,
    predictors=None,
    max_new_tokens: int = 16,
    *,
    rule: Rule | None = None,
    static_source=None,
    layers=None,
    chat: bool = False,
    compare_dense: bool = False,
) -> LiveResult:
    """Greedy generation with the sparse model; per step stats, masks and timings.

        >>> r = sparse_generate(model, tok, "def fib(n):", mode="oracle", density=0.3)
        >>> r = sparse_generate(model, tok, "Hi", mode="predicted", density=0.4,
        ...                     predictors=predictors, max_new_tokens=32)
        >>> r = sparse_generate(model, tok, "Hi", mode="static", density=0.5, static_source=trace)

    - ``mode="oracle"``: each token's true mask under ``rule`` (default ``TopK(density)``);
      ``"predicted"``: ``predictors`` re-thresholded to ``density`` (weight cache +
      sparse kernel); ``"static"``: ``static_source`` (a trace: its ``density`` most
      frequent neurons per layer; or ``{layer: indices}``).
    - ``chat``: wrap the prompt in the tokenizer's chat template (instruct models).
    - ``compare_dense``: also generate densely (same greedy settings) into ``dense_text``.

    The prompt runs dense (``prefill="dense"``), decode steps run sparse; batch size 1.
    Arguments are checked before the model is touched; the model is dense on return.
    """
    from sparselab._version import versions
    from sparselab.runtime.sparsify import SPARSIFY_MODES, sparsify

    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("prompt must be a non-empty string")
    check_choice("mode", mode, SPARSIFY_MODES)
    density = check_fraction("density", density)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) \
            or max_new_tokens < 2:
        raise ValueError(f"max_new_tokens must be an int >= 2 (one decode step needs two "
                         f"tokens), got {max_new_tokens!r}")
    if mode == "predicted" and predictors is None:
        raise ValueError('mode="predicted" needs predictors=')
    if mode == "static" and static_source is None:
        raise ValueError('mode="static" needs static_source= (a trace or {layer: indices})')
    if mode == "predicted" and rule is not None:
        raise ValueError(f"rule= applies to the oracle (and static) modes, not {mode!r}")

    kwargs: dict[str, Any] = {"mode": mode, "layers": layers, "prefill": "dense"}
    if mode == "oracle":
        kwargs["rule"] = rule if rule is not None else TopK(keep=float(density))
    elif mode == "predicted":
        kwargs.update(predictors=predictors, density=float(density))
    elif isinstance(static_source, Mapping):
        kwargs["static_neurons"] = static_source
    else:
        kwargs["static_neurons"] = static_from_trace(static_source, rule, float(density), layers=layers)
    batch = _prompt_ids(tokenizer, prompt, chat)
    eos = tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id

    dense_ids = _greedy(model, batch, int(max_new_tokens), eos) if compare_dense else None
    with sparsify(model, **kwargs) as handle:
        clock_hooks, spans = _step_clock(model)
        tap_hooks, taps = _mask_taps(handle)
        try:
            new_ids = _greedy(model, batch, int(max_new_tokens), eos)
        finally:
            for h in clock_hooks + tap_hooks:
                h.remove()
        stats = handle.stats()
        config = {**handle.config}

    ids = new_ids.tolist()
    pieces = tokenizer.batch_decode([[t] for t in ids])
    stats = stats.drop(columns=["mode"])
    decode = stats[stats["phase"] == "decode"].reset_index(drop=True)
    prefill = stats[stats["phase"] == "prefill"].reset_index(drop=True)
    decode["token"] = decode["step"] - 1
    decode["piece"] = [pieces[t] if 0 <= t < len(pieces) else "" for t in decode["token"]]

    chosen = tuple(sorted(taps))
    n_steps = len(taps[chosen[0]]) if chosen else 0
    if any(len(taps[layer]) != n_steps for layer in chosen):
        raise RuntimeError("sparse MLPs saw different numbers of decode calls")
    bools = np.stack([np.stack(taps[layer]) for layer in chosen]) if n_steps else \
        np.zeros((len(chosen), 0, handle.adapter.n_neurons), dtype=bool)
    prompt_len = int(batch["input_ids"].shape[1])
    masks = Masks.from_bool(
        bools, layers=chosen, seq_ids=np.zeros(n_steps, dtype=np.int64),
        positions=prompt_len + np.arange(n_steps, dtype=np.int64),
        rule=kwargs["rule"].describe() if mode == "oracle" else {"mode": mode, "density": float(density)},
    )
    step_times = pd.DataFrame({
        "step": np.arange(len(spans), dtype=np.int64),
        "phase": ["prefill"] + ["decode"] * (len(spans) - 1) if spans else [],
        "wall_ns": np.array([b - a for a, b in spans], dtype=np.int64),
    })
    config.update({"prompt_tokens": prompt_len, "max_new_tokens": int(max_new_tokens), "chat": chat,
                   "density": float(density), "versions": versions()})
    for frame in (decode, prefill, step_times):
        frame.attrs["config"] = config
    return LiveResult(
        prompt=prompt,
        text=tokenizer.decode(ids, skip_special_tokens=True),
        tokens=pieces,
        token_ids=np.asarray(ids, dtype=np.int64),
        stats=decode,
        prefill=prefill,
        masks=masks,
        step_times=step_times,
        config=config,
        dense_text=None if dense_ids is None else tokenizer.decode(dense_ids.tolist(), skip_special_tokens=True),
    )


# ----------------------------------------------------------------------------- summaries


def _check_stats(stats: pd.DataFrame, columns, what: str) -> None:
    missing = [c for c in columns if c not in stats.columns]
    if missing:
        raise ValueError(f"{what} needs stats columns {missing}; got {list(stats.columns)}")


def time_split(result: LiveResult | pd.DataFrame, step_times: pd.DataFrame | None = None) -> pd.DataFrame:
    """Milliseconds per decode step and component, summed over layers (long frame).

        >>> sl.runtime.generate.time_split(result).pivot(index="step", columns="component", values="ms")

    Components: :data:`COMPONENTS` from the stats, plus ``"rest of the model"`` = the
    step's wall time minus them (when ``step_times`` are known; never below 0).
    Columns: ``step, component, ms``.
    """
    stats = result.stats if isinstance(result, LiveResult) else result
    if isinstance(result, LiveResult) and step_times is None:
        step_times = result.step_times
    _check_stats(stats, ["step", *COMPONENTS], "time_split")
    per_step = stats.groupby("step")[list(COMPONENTS)].sum().sort_index() / 1e6
    per_step = per_step.rename(columns=COMPONENTS)
    if step_times is not None and len(step_times):
        wall = step_times.set_index("step")["wall_ns"].reindex(per_step.index) / 1e6
        per_step[OTHER] = (wall - per_step.sum(axis=1)).clip(lower=0.0)
    out = per_step.reset_index().melt(id_vars="step", var_name="component", value_name="ms")
    out["component"] = pd.Categorical(out["component"], categories=list(per_step.columns))
    return out.sort_values(["step", "component"], ignore_index=True)


def cache_traffic(result: LiveResult | pd.DataFrame) -> pd.DataFrame:
    """Per decode step, summed over layers: rows copied, bytes moved, neurons added/removed.

        >>> sl.runtime.generate.cache_traffic(result)[["step", "rows_copied", "changed"]]

    ``changed = added + removed`` is what the mask churned; ``rows_copied`` what the
    weight cache actually copied (0 when the mode runs without a cache, e.g. oracle).
    Columns: ``step, rows_copied, bytes_moved, added, removed, changed, active``.
    """
    stats = result.stats if isinstance(result, LiveResult) else result
    _check_stats(stats, ["step", "rows_copied", "bytes_moved", "added", "removed", "active"], "cache_traffic")
    out = stats.groupby("step")[["rows_copied", "bytes_moved", "added", "removed", "active"]].sum()
    out["changed"] = out["added"] + out["removed"]
    return out.reset_index()
