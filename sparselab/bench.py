"""End-to-end generation benchmark: time to first token, decode speed, peak memory, byte bound.

    >>> budget = sl.bench.decode_bytes(model)                  # weight bytes read per token
    >>> budget.f, budget.bound(0.5), budget.bound(0.5, extra_bytes=predictors.bytes)
    >>> runs = sl.bench.compare(model, prompt_ids, {"dense": None,
    ...     "sparse": lambda: sl.sparsify(model, predictors, density=0.5)}, num_runs=5)
    >>> sl.bench.summarize(runs)                               # medians, IQR, min/max

Single-token decode is memory-bound: each step reads every weight once, so its time is
about ``bytes read / bandwidth``. With ``f`` the share of those bytes in the MLPs and ``d``
the MLP density, no sparse MLP can make decoding faster than ``1 / ((1 - f) + f d)``
(:meth:`DecodeBytes.bound`); a predictor's own weights are read too and lower the bound
further. Bytes read per decoded token are all weights except the embedding table, of which
only one row is read - but the LM head is read whole every token, also when it is tied to
the embedding. (KV cache reads are not weights and are not counted: at the short contexts
benchmarked here they are a fraction of a percent of the weights.)

:func:`compare` measures variants (dense, sparse with or without the weight cache, ...)
*alternately* in one process - a run of each variant per cycle, the order rotating every
cycle - so a noisy neighbour or a frequency change hits all of them alike. Each run is one
greedy ``model.generate`` with the KV cache and a fixed number of new tokens (no EOS
stop), timed by forward hooks (:func:`time_generate`) while a background thread samples the
process's resident memory (:class:`MemorySampler`).
"""

from __future__ import annotations

import gc
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from sparselab.heap import trim_heap

__all__ = [
    "DecodeBytes",
    "GenerationTiming",
    "MemorySampler",
    "RandomLowRankPredictors",
    "bound_curve",
    "byte_bound",
    "check_targets",
    "compare",
    "decode_bytes",
    "decode_bytes_from_config",
    "decode_split",
    "headline",
    "release_memory",
    "rss_bytes",
    "shortfall",
    "speedups",
    "split_table",
    "summarize",
    "time_generate",
]

MB = 2**20


# --------------------------------------------------------------------------------------
# the byte bound
# --------------------------------------------------------------------------------------


def byte_bound(f: float, density: float, extra_share: float = 0.0) -> float:
    """Upper bound on the decode speedup of a sparse MLP: ``1 / ((1 - f) + f d + e)``.

        >>> round(byte_bound(0.59, 0.5), 2)
        1.42

    ``f``: MLP share of the weight bytes read per token; ``density``: share of MLP
    neurons computed; ``extra_share``: bytes the sparse model reads on top (e.g. its
    predictors), as a share of the dense model's bytes.
    """
    if not 0.0 <= f <= 1.0:
        raise ValueError(f"f must be in [0, 1], got {f}")
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density must be in [0, 1], got {density}")
    if extra_share < 0:
        raise ValueError(f"extra_share must be >= 0, got {extra_share}")
    return 1.0 / ((1.0 - f) + f * density + extra_share)


@dataclass(frozen=True)
class DecodeBytes:
    """Weight bytes one decoded token reads, split into the MLPs and everything else.

        >>> b = decode_bytes(model); b.f, b.bound(0.3), b.bound(0.3, extra_bytes=p.bytes)

    ``other`` holds attention, norms, the LM head (``lm_head``, counted even when tied)
    and one embedding row (``embedding_row``).
    """

    mlp: int
    other: int
    lm_head: int
    embedding_row: int
    n_layers: int

    @property
    def total(self) -> int:
        return self.mlp + self.other

    @property
    def f(self) -> float:
        """MLP share of the bytes read per token."""
        return self.mlp / self.total

    def bound(self, density: float, extra_bytes: int = 0) -> float:
        """Decode speedup bound at MLP ``density``; ``extra_bytes`` (e.g. predictors) are
        read on the sparse side only."""
        return byte_bound(self.f, density, extra_bytes / self.total)

    def describe(self) -> dict[str, Any]:
        return {"mlp": self.mlp, "other": self.other, "lm_head": self.lm_head,
                "embedding_row": self.embedding_row, "total": self.total, "f": self.f,
                "n_layers": self.n_layers}


def bound_curve(budget: DecodeBytes, densities: Iterable[float] | None = None,
                extra_bytes: int = 0) -> pd.DataFrame:
    """The byte bound against MLP density, without and with ``extra_bytes`` (predictors).

        >>> bound_curve(decode_bytes(model), extra_bytes=predictors.bytes).plot(x="density")

    Columns: density, bound, bound_with_extra.
    """
    d = np.linspace(0.05, 1.0, 20) if densities is None else np.asarray(list(densities), dtype=float)
    return pd.DataFrame({"density": d, "bound": [budget.bound(x) for x in d],
                         "bound_with_extra": [budget.bound(x, extra_bytes) for x in d]})


def _unique_params(module: nn.Module) -> dict[int, nn.Parameter]:
    # tied weights are one Parameter object reachable under two names: count it once
    return {id(p): p for p in module.parameters()}


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def decode_bytes(model: nn.Module) -> DecodeBytes:
    """Bytes of weights a decode step of ``model`` reads, from its actual parameters.

        >>> decode_bytes(model).f          # ~0.59 for SmolLM2-135M
    """
    from sparselab.models import adapter_for

    adapter = adapter_for(model)
    params = _unique_params(model)
    mlp_ids: set[int] = set()
    for spec in adapter.layers:
        mlp_ids |= set(_unique_params(spec.mlp))
    mlp = sum(_nbytes(params[i]) for i in mlp_ids if i in params)
    emb = model.get_input_embeddings().weight
    head_module = model.get_output_embeddings()
    head = head_module.weight if head_module is not None else emb
    tied = head.data_ptr() == emb.data_ptr()
    rest = sum(_nbytes(p) for i, p in params.items() if i not in mlp_ids)
    row = emb.shape[1] * emb.element_size()
    # the table is not read (one row is); a tied head *is* the table and is read whole
    other = rest - _nbytes(emb) + row + (_nbytes(head) if tied else 0)
    return DecodeBytes(mlp=mlp, other=other, lm_head=_nbytes(head), embedding_row=row,
                       n_layers=adapter.n_layers)


def decode_bytes_from_config(config, dtype: torch.dtype = torch.float32,
                             num_hidden_layers: int | None = None) -> DecodeBytes:
    """:func:`decode_bytes` from a Llama-style config, without building the model.

        >>> decode_bytes_from_config(LlamaConfig(...), num_hidden_layers=28).bound(0.3)

    Counts q/k/v/o projections (grouped-query: k and v have ``num_key_value_heads``),
    gate/up/down, two norms per layer, the final norm, the LM head and one embedding row;
    biases when ``attention_bias`` / ``mlp_bias`` say so.
    """
    c = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden, inter = int(c.hidden_size), int(c.intermediate_size)
    layers = int(num_hidden_layers if num_hidden_layers is not None else c.num_hidden_layers)
    heads = int(c.num_attention_heads)
    kv = int(getattr(c, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(c, "head_dim", None) or hidden // heads)
    vocab = int(c.vocab_size)
    size = torch.empty((), dtype=dtype).element_size()
    q, k = heads * head_dim, kv * head_dim
    attn = hidden * q + 2 * hidden * k + q * hidden
    if getattr(c, "attention_bias", False):
        attn += q + 2 * k + hidden
    mlp = 3 * hidden * inter + ((2 * inter + hidden) if getattr(c, "mlp_bias", False) else 0)
    other = layers * (attn + 2 * hidden) + hidden + vocab * hidden + hidden
    return DecodeBytes(mlp=layers * mlp * size, other=other * size, lm_head=vocab * hidden * size,
                       embedding_row=hidden * size, n_layers=layers)


# --------------------------------------------------------------------------------------
# memory
# --------------------------------------------------------------------------------------


def _psutil():
    try:
        import psutil
    except ImportError as err:  # pragma: no cover - psutil ships with ipykernel
        raise ImportError("sparselab.bench needs psutil to read the resident memory: "
                          "pip install psutil") from err
    return psutil


def rss_bytes() -> int:
    """Resident memory of this process now, in bytes (psutil)."""
    return int(_psutil().Process().memory_info().rss)


_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc ``malloc_trim``), so
    the RSS that follows shows what is held, not what a previous run once allocated."""
    gc.collect()
    trim_heap()


def _reset_kernel_peak() -> bool:
    """Reset the kernel's peak-RSS counter (Linux: write 5 to clear_refs); False if not allowed."""
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def _kernel_peak() -> int | None:
    """The kernel's peak RSS (``VmHWM``) in bytes, or None where /proc has none."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class MemorySampler(AbstractContextManager):
    """Peak resident memory of this process while a block runs (a background thread).

        >>> with MemorySampler(interval=0.002) as mem:
        ...     x = torch.ones(50_000_000)
        >>> (mem.peak_rss - mem.start_rss) / 2**20                # ~190 MiB

    The thread reads the RSS with psutil every ``interval`` seconds (plus once at entry
    and exit), so a spike shorter than ``interval`` can be missed; on Linux the kernel's
    own high-water mark is reset at entry and read at exit as ``kernel_peak_rss`` (None
    elsewhere), which misses nothing.
    """

    def __init__(self, interval: float = 0.002) -> None:
        if not interval > 0:
            raise ValueError(f"interval must be > 0 seconds, got {interval}")
        self.interval = float(interval)
        self.start_rss = self.end_rss = self.peak_rss = 0
        self.kernel_peak_rss: int | None = None
        self.n_samples = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._kernel = False

    def _run(self, process) -> None:
        peak, n = self.peak_rss, 0
        while not self._stop.wait(self.interval):
            rss = process.memory_info().rss
            n += 1
            if rss > peak:
                peak = rss
        self.peak_rss, self.n_samples = max(self.peak_rss, peak), self.n_samples + n

    def __enter__(self) -> MemorySampler:
        if self._thread is not None:
            raise RuntimeError("a MemorySampler measures one block; make a new one")
        process = _psutil().Process()
        self._kernel = _reset_kernel_peak()
        self.start_rss = self.peak_rss = int(process.memory_info().rss)
        self._thread = threading.Thread(target=self._run, args=(process,), daemon=True,
                                        name="sparselab-memory-sampler")
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.end_rss = rss_bytes()
        self.peak_rss = max(self.peak_rss, self.end_rss)
        self.n_samples += 2
        if self._kernel:
            self.kernel_peak_rss = _kernel_peak()


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
    from sparselab.models import _decoder_layers

    return [layer.mlp for layer in _decoder_layers(model)]


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


# --------------------------------------------------------------------------------------
# alternating comparison
# --------------------------------------------------------------------------------------

Factory = Callable[[], Any] | None


def _order(names: Sequence[str], cycle: int) -> list[str]:
    k = cycle % len(names)
    return list(names[k:]) + list(names[:k])


def compare(
    model: nn.Module,
    input_ids: torch.Tensor,
    variants: Mapping[str, Factory],
    num_runs: int = 10,
    warmup_runs: int = 1,
    max_new_tokens: int = 32,
    attention_mask: torch.Tensor | None = None,
    pad_token_id: int | None = None,
    memory_interval: float = 0.002,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> pd.DataFrame:
    """Generate with each variant ``warmup_runs + num_runs`` times, alternating; one row per run.

        >>> runs = compare(model, ids, {"dense": None,
        ...                             "sparse": lambda: sl.sparsify(model, p, density=0.5)})

    ``variants``: name -> ``None`` (the model as it is) or a factory returning a handle
    that changes the model until ``.restore()`` (e.g. :func:`sparselab.sparsify`). Each
    cycle runs every variant once, the order rotating by one per cycle. Before each run
    (untimed): the factory is called, one single-token forward primes it (fills a weight
    cache as the previous request would have; done for every variant alike), the
    handle's stats are reset and garbage is collected. During the run the resident
    memory is sampled (:class:`MemorySampler`). Columns: cycle, variant, warmup, timings
    (``ttft_ms``, ``decode_tokens_per_s``, ``total_tokens_per_s``, ``total_s``), memory in
    bytes (``rss_at_rest``, ``peak_rss``, ``kernel_peak_rss``, ``extra_bytes`` of the
    handle) and the :func:`decode_split` columns. ``df.attrs["outputs"]`` holds each
    variant's generated ids of its last run.
    """
    from tqdm.auto import tqdm

    if not variants:
        raise ValueError("variants is empty: give at least one {name: factory or None}")
    if not isinstance(num_runs, int) or num_runs < 1:
        raise ValueError(f"num_runs must be an int >= 1, got {num_runs!r}")
    if not isinstance(warmup_runs, int) or warmup_runs < 0:
        raise ValueError(f"warmup_runs must be an int >= 0, got {warmup_runs!r}")
    for name, factory in variants.items():
        if factory is not None and not callable(factory):
            raise ValueError(f"variant {name!r} must be None or a callable returning a handle")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 2:
        raise ValueError(f"max_new_tokens must be an int >= 2, got {max_new_tokens!r}")
    names = list(variants)
    cycles = warmup_runs + num_runs
    rows, outputs = [], {}
    bar = tqdm(total=cycles * len(names), desc="benchmark", unit="run", disable=not progress)
    try:
        for cycle in range(cycles):
            for name in _order(names, cycle):
                row, out_ids = _one_run(model, input_ids, variants[name], max_new_tokens,
                                        attention_mask, pad_token_id, memory_interval)
                row = {"cycle": cycle, "variant": name, "warmup": cycle < warmup_runs, **row}
                rows.append(row)
                outputs[name] = out_ids
                bar.update()
                bar.set_postfix(variant=name, tok_s=f"{row['decode_tokens_per_s']:.2f}")
                if log is not None:
                    log(f"{'warm-up' if row['warmup'] else 'run'} {cycle:3d} {name:<14} "
                        f"ttft {row['ttft_ms']:8.1f} ms  decode {row['decode_tokens_per_s']:7.2f} tok/s  "
                        f"peak {row['peak_rss'] / MB:8.1f} MiB")
    finally:
        bar.close()
    df = pd.DataFrame(rows)
    df.attrs["outputs"] = outputs
    df.attrs["variants"] = names
    return df


def _one_run(model, input_ids, factory, max_new_tokens, attention_mask, pad_token_id,
             memory_interval) -> tuple[dict, torch.Tensor]:
    handle = factory() if factory is not None else None
    try:
        with torch.no_grad():
            model(input_ids=input_ids[:, :1], use_cache=False)  # prime (untimed)
        if handle is not None and hasattr(handle, "reset_stats"):
            handle.reset_stats()
        release_memory()
        rest = rss_bytes()
        with MemorySampler(memory_interval) as mem:
            timing = time_generate(model, input_ids, max_new_tokens, attention_mask, pad_token_id)
        stats = handle.stats() if handle is not None and hasattr(handle, "stats") else None
        extra = int(getattr(handle, "extra_bytes", 0) or 0) if handle is not None else 0
        held = _active_rows_bytes(handle, stats)
    finally:
        if handle is not None:
            handle.restore()
    row = {
        "ttft_ms": timing.ttft_s * 1e3,
        "decode_tokens_per_s": timing.decode_tokens_per_s,
        "total_tokens_per_s": timing.total_tokens_per_s,
        "total_s": timing.total_s,
        "n_prompt": timing.n_prompt,
        "n_new": timing.n_new,
        "rss_at_rest": rest,
        "peak_rss": mem.peak_rss,
        "kernel_peak_rss": mem.kernel_peak_rss if mem.kernel_peak_rss is not None else np.nan,
        "memory_samples": mem.n_samples,
        "extra_bytes": extra,
        "active_rows_bytes": held,
        **decode_split(timing, stats),
    }
    return row, timing.output_ids


def _active_rows_bytes(handle, stats: pd.DataFrame | None) -> int:
    """Bytes of the weight rows a handle's caches needed at most during the run: per layer
    the largest active set of a decode step (gate + up + down row per neuron). The
    caches' ``extra_bytes`` is their capacity, which growth by doubling can make larger."""
    caches = getattr(handle, "caches", None) if handle is not None else None
    if not caches:
        return 0
    dec = stats[stats["phase"] == "decode"] if stats is not None and len(stats) else None
    peak = dec.groupby("layer")["active"].max() if dec is not None else pd.Series(dtype=float)
    total = 0
    for layer, cache in caches.items():
        n = max(int(peak.get(layer, 0)), int(cache.n_active))
        total += n * 3 * int(cache.hidden) * cache.dtype.itemsize
    return total


# --------------------------------------------------------------------------------------
# summaries and targets (pure functions of the runs frame)
# --------------------------------------------------------------------------------------

SUMMARY_METRICS = ("ttft_ms", "decode_tokens_per_s", "step_ms", "total_tokens_per_s",
                   "peak_rss", "kernel_peak_rss", "rss_at_rest", "extra_bytes", "active_rows_bytes")


def _measured(runs: pd.DataFrame) -> pd.DataFrame:
    """Non-warm-up runs, ordered by variant as given to :func:`compare` (then by cycle)."""
    out = runs[~runs["warmup"]] if "warmup" in runs else runs
    if out.empty:
        raise ValueError("no measured (non-warm-up) runs in the frame")
    order = list(runs.attrs.get("variants") or dict.fromkeys(runs["variant"]))
    rank = out["variant"].map({v: i for i, v in enumerate(order)})
    return out.assign(_rank=rank).sort_values(["_rank", "cycle"], kind="stable").drop(columns="_rank")


def summarize(runs: pd.DataFrame, metrics: Iterable[str] | None = None) -> pd.DataFrame:
    """Median, quartiles, IQR, min and max of each metric per variant (warm-ups excluded).

        >>> summarize(runs).loc[("dense", "decode_tokens_per_s")]
    """
    runs = _measured(runs)
    metrics = [m for m in (metrics or SUMMARY_METRICS) if m in runs]
    rows = []
    for variant, part in runs.groupby("variant", sort=False):
        for m in metrics:
            v = part[m].to_numpy(dtype=np.float64)
            v = v[np.isfinite(v)]
            if not len(v):
                continue
            q1, med, q3 = np.percentile(v, [25, 50, 75])
            rows.append({"variant": variant, "metric": m, "n": len(v), "median": med, "q1": q1,
                         "q3": q3, "iqr": q3 - q1, "min": v.min(), "max": v.max()})
    return pd.DataFrame(rows).set_index(["variant", "metric"])


def split_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Median over runs of each :func:`decode_split` column, one row per variant (ms/step)."""
    runs = _measured(runs)
    cols = [c for c in ("step_ms", "generate_ms", "forward_ms", "rest_ms", "mlp_ms", "predictor_ms",
                        "mask_ms", "cache_ms", "kernel_ms", "mlp_other_ms", "active_density",
                        "rows_copied", "added") if c in runs]
    return runs.groupby("variant", sort=False)[cols].median()


GAP_PARTS = ("kernel_ms", "predictor_ms", "mask_ms", "cache_ms", "mlp_other_ms", "rest_ms",
             "generate_ms")


def shortfall(runs: pd.DataFrame, budget: DecodeBytes, density: float, predictor_bytes: int = 0,
              baseline: str = "dense") -> pd.DataFrame:
    """Where each sparse variant's decode step loses time against the byte-bound ideal.

        >>> shortfall(runs, budget, 0.5, predictors.bytes).loc["sparse_direct"]

    The ideal sparse step is the dense step with its MLP time scaled to the bytes the
    sparse side reads: the kernel ``d`` x dense MLP time, the predictor its bytes' share of
    the MLP bytes x dense MLP time, mask / cache update / wrapper nothing, the rest of the
    model and the generate loop as dense. Per component (ms per token, medians of per-run
    means): ``actual``, ``ideal``, ``excess`` = actual - ideal and ``share`` of the total
    excess - the excesses add up to the variant's step minus the ideal step.
    """
    split = split_table(runs)
    if baseline not in split.index:
        raise ValueError(f"baseline {baseline!r} is not a variant ({list(split.index)})")
    base = split.loc[baseline]
    mlp = float(base["mlp_ms"])
    ideal = {"kernel_ms": mlp * density, "predictor_ms": mlp * predictor_bytes / budget.mlp,
             "mask_ms": 0.0, "cache_ms": 0.0, "mlp_other_ms": 0.0,
             "rest_ms": float(base["rest_ms"]), "generate_ms": float(base["generate_ms"])}
    rows = []
    for variant, row in split.iterrows():
        if variant == baseline:
            continue
        excess = {c: float(np.nan_to_num(row.get(c, 0.0))) - ideal[c] for c in GAP_PARTS}
        total = sum(excess.values())
        for c in GAP_PARTS:
            rows.append({"variant": variant, "component": c.removesuffix("_ms"),
                         "actual_ms": excess[c] + ideal[c], "ideal_ms": ideal[c],
                         "excess_ms": excess[c], "share": excess[c] / total if total else np.nan})
    return pd.DataFrame(rows).set_index(["variant", "component"])


def speedups(runs: pd.DataFrame, baseline: str = "dense") -> pd.DataFrame:
    """Each variant against ``baseline``: ratios of medians, and paired per-cycle ratios.

        >>> speedups(runs).loc["sparse", ["decode_speedup", "ttft_ratio"]]

    ``decode_speedup`` = median decode tokens/s over the baseline's; ``decode_speedup_q1/q3``
    are quartiles of the same ratio taken cycle by cycle (the runs of one cycle ran back to
    back); ``ttft_ratio`` = median TTFT / baseline's (< 1 is faster); ``peak_rss_ratio``.
    """
    runs = _measured(runs)
    if baseline not in set(runs["variant"]):
        raise ValueError(f"baseline {baseline!r} is not a variant ({sorted(set(runs['variant']))})")
    med = runs.groupby("variant", sort=False)[["decode_tokens_per_s", "ttft_ms",
                                               "total_tokens_per_s", "peak_rss"]].median()
    base = runs[runs["variant"] == baseline].set_index("cycle")
    rows = []
    for variant, part in runs.groupby("variant", sort=False):
        if variant == baseline:
            continue
        paired = part.set_index("cycle")["decode_tokens_per_s"] / base["decode_tokens_per_s"]
        paired = paired.dropna().to_numpy()
        q1, q3 = (np.percentile(paired, [25, 75]) if len(paired) else (np.nan, np.nan))
        rows.append({
            "variant": variant,
            "decode_speedup": med.at[variant, "decode_tokens_per_s"] / med.at[baseline, "decode_tokens_per_s"],
            "decode_speedup_paired": float(np.median(paired)) if len(paired) else np.nan,
            "decode_speedup_q1": q1, "decode_speedup_q3": q3,
            "ttft_ratio": med.at[variant, "ttft_ms"] / med.at[baseline, "ttft_ms"],
            "total_speedup": med.at[variant, "total_tokens_per_s"] / med.at[baseline, "total_tokens_per_s"],
            "peak_rss_ratio": med.at[variant, "peak_rss"] / med.at[baseline, "peak_rss"],
        })
    return pd.DataFrame(rows).set_index("variant")


def check_targets(runs: pd.DataFrame, budget: DecodeBytes, density: float,
                  predictor_bytes: int = 0, baseline: str = "dense",
                  cached: Iterable[str] = (), resident_bytes: int = 0,
                  speed_share: float = 0.9, memory_slack: float = 0.05,
                  ttft_slack: float = 0.05) -> pd.DataFrame:
    """The issue's targets per sparse variant, with the value reached and whether it is met.

        >>> check_targets(runs, budget, 0.5, predictors.bytes, cached=["sparse_cache"])

    - decode speedup >= ``speed_share`` x the byte bound with the predictors' bytes;
    - peak RSS <= dense + ``memory_slack`` x dense, plus, for variants in ``cached``, the
      active rows the cache must hold (``active_rows_bytes``: the largest active set per
      layer - spare capacity beyond it counts as duplicated weights). ``resident_bytes``
      (e.g. predictors kept in memory during the dense runs too) are taken off the dense
      baseline, so the sparse side carries them;
    - TTFT <= dense x (1 + ``ttft_slack``) (the slack absorbs timer noise).
    """
    runs = _measured(runs)
    sp = speedups(runs, baseline)
    if "active_rows_bytes" not in runs:
        runs = runs.assign(active_rows_bytes=0)
    med = runs.groupby("variant", sort=False)[["peak_rss", "extra_bytes", "active_rows_bytes"]].median()
    bound = budget.bound(density, predictor_bytes)
    dense_peak = med.at[baseline, "peak_rss"] - resident_bytes
    cached = set(cached)
    rows = []
    for variant in sp.index:
        s = sp.loc[variant]
        rows.append({"variant": variant, "target": "decode speedup >= "
                     f"{speed_share:.0%} of byte bound (predictor incl.)",
                     "value": s["decode_speedup"], "threshold": speed_share * bound,
                     "met": bool(s["decode_speedup"] >= speed_share * bound),
                     "detail": f"{s['decode_speedup']:.3f}x vs bound {bound:.3f}x "
                               f"(ratio {s['decode_speedup'] / bound:.2f})"})
        allowance = med.at[variant, "active_rows_bytes"] if variant in cached else 0.0
        limit = dense_peak * (1 + memory_slack) + allowance
        peak = med.at[variant, "peak_rss"]
        what = "dense + active rows + " if variant in cached else "dense + "
        detail = f"{peak / MB:.1f} MiB vs dense {dense_peak / MB:.1f} MiB (+{(peak - dense_peak) / MB:.1f} MiB"
        if variant in cached:
            detail += (f"; active rows {allowance / MB:.1f} MiB, cache capacity "
                       f"{med.at[variant, 'extra_bytes'] / MB:.1f} MiB")
        rows.append({"variant": variant, "target": f"peak RSS <= {what}{memory_slack:.0%}",
                     "value": peak / MB, "threshold": limit / MB, "met": bool(peak <= limit),
                     "detail": detail + ")"})
        rows.append({"variant": variant, "target": "TTFT no worse than dense",
                     "value": s["ttft_ratio"], "threshold": 1 + ttft_slack,
                     "met": bool(s["ttft_ratio"] <= 1 + ttft_slack),
                     "detail": f"TTFT ratio {s['ttft_ratio']:.3f} (slack {ttft_slack:.0%})"})
    return pd.DataFrame(rows)


def headline(runs: pd.DataFrame, budget: DecodeBytes | None = None, density: float | None = None,
             predictor_bytes: int = 0, baseline: str = "dense") -> pd.DataFrame:
    """The original project's headline table: TTFT, decode speed, memory, per variant.

        >>> headline(runs, budget, density=0.5, predictor_bytes=p.bytes)

    Medians with [q1-q3] in the cells; speedups against ``baseline``; with ``budget``
    and ``density`` the byte bound (with predictors) and the share of it reached.
    """
    runs = _measured(runs)
    sp = speedups(runs, baseline) if runs["variant"].nunique() > 1 else pd.DataFrame()
    rows = []
    for variant, part in runs.groupby("variant", sort=False):
        def cell(col, scale=1.0, fmt="{:.1f}", part=part):
            q1, med, q3 = np.percentile(part[col].to_numpy(dtype=float) * scale, [25, 50, 75])
            return f"{fmt.format(med)} [{fmt.format(q1)}-{fmt.format(q3)}]"
        row = {"variant": variant, "TTFT ms": cell("ttft_ms"),
               "decode tok/s": cell("decode_tokens_per_s", fmt="{:.2f}"),
               "total tok/s": cell("total_tokens_per_s", fmt="{:.2f}"),
               "peak RSS MiB": cell("peak_rss", 1 / MB),
               "cache MiB (active / capacity)": (
                   f"{part['active_rows_bytes'].median() / MB:.1f} / {part['extra_bytes'].median() / MB:.1f}"
                   if "active_rows_bytes" in part else f"{part['extra_bytes'].median() / MB:.1f}")}
        if variant in sp.index:
            row["decode speedup"] = f"{sp.at[variant, 'decode_speedup']:.3f}x"
            row["TTFT ratio"] = f"{sp.at[variant, 'ttft_ratio']:.3f}"
            if budget is not None and density is not None:
                bound = budget.bound(density, predictor_bytes)
                row["byte bound"] = f"{budget.bound(density):.3f}x / {bound:.3f}x"
                row["of bound"] = f"{sp.at[variant, 'decode_speedup'] / bound:.0%}"
        rows.append(row)
    return pd.DataFrame(rows).set_index("variant").fillna("")


# --------------------------------------------------------------------------------------
# a stand-in predictor with a fixed density (speed does not depend on its accuracy)
# --------------------------------------------------------------------------------------


def _fill_(t: torch.Tensor, scale: float, generator: torch.Generator) -> None:
    """Fill ``t`` with uniform(-scale, scale) values tiled from one random block: random
    numbers cost ~30x a copy, and a benchmark's speed does not depend on the values. The
    block's odd length keeps consecutive rows from repeating each other."""
    flat = t.detach().view(-1)
    block = torch.empty(min(flat.numel(), (1 << 20) + 7), dtype=t.dtype)
    block.uniform_(-scale, scale, generator=generator)
    for start in range(0, flat.numel(), block.numel()):
        stop = min(flat.numel(), start + block.numel())
        flat[start:stop].copy_(block[: stop - start])


class RandomLowRankPredictors:
    """Random low-rank predictors keeping the top ``density`` share of neurons per token.

        >>> p = RandomLowRankPredictors(hidden=3072, n_neurons=8192, layers=range(4), rank=327)
        >>> sl.sparsify(model, p)                 # 30 % of neurons per token, every layer

    Same shapes and cost as trained :class:`sparselab.predictors.Predictors` (``first``
    ``[r, H]``, ``second`` ``[N, r]``, bias ``[N]`` per layer; ``bytes`` counts them) with
    random weights: for benchmarking speed on models whose weights are random too. Masks
    of consecutive tokens are nearly independent, so a weight cache sees far more churn
    than with trained predictors on a real model.
    """

    lookahead = False

    def __init__(self, hidden: int, n_neurons: int, layers: Iterable[int], rank: int | float,
                 density: float = 0.3, seed: int = 0, dtype: torch.dtype = torch.float32) -> None:
        layers = tuple(int(i) for i in layers)
        if not layers:
            raise ValueError("layers is empty")
        if isinstance(rank, float):
            if not 0.0 < rank <= 1.0:
                raise ValueError(f"a float rank is a fraction of n_neurons in (0, 1], got {rank}")
            rank = max(1, round(rank * n_neurons))
        if not 1 <= int(rank) <= min(hidden, n_neurons):
            raise ValueError(f"rank must be in [1, min(hidden, n_neurons)] = "
                             f"[1, {min(hidden, n_neurons)}], got {rank}")
        if not 0.0 < density <= 1.0:
            raise ValueError(f"density must be in (0, 1], got {density}")
        self.hidden_size, self.n_neurons, self.rank = int(hidden), int(n_neurons), int(rank)
        self.density, self.seed, self.layers = float(density), int(seed), layers
        self.k = max(1, round(self.density * self.n_neurons))
        g = torch.Generator().manual_seed(self.seed)
        self._weights = {}
        for layer in layers:
            first = torch.empty(self.rank, self.hidden_size, dtype=dtype)
            second = torch.empty(self.n_neurons, self.rank, dtype=dtype)
            bias = torch.empty(self.n_neurons, dtype=dtype)
            _fill_(first, 1 / math.sqrt(self.hidden_size), g)
            _fill_(second, 1 / math.sqrt(self.rank), g)
            _fill_(bias, 0.1, g)
            self._weights[layer] = (first, second, bias)

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self._weights.values()))[0].dtype

    @property
    def bytes(self) -> int:
        return sum(_nbytes(t) for w in self._weights.values() for t in w)

    def scores(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        first, second, bias = self._weights[int(layer)]
        flat = x.reshape(-1, self.hidden_size).to(first.dtype)
        return torch.addmm(bias, flat @ first.T, second.T).reshape(*x.shape[:-1], self.n_neurons)

    def mask(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        s = self.scores(layer, x)
        out = torch.zeros(s.shape, dtype=torch.bool)
        return out.scatter_(-1, s.topk(self.k, dim=-1).indices, True)

    def union_mask(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        return self.mask(layer, x).reshape(-1, self.n_neurons).any(0)

    def describe(self) -> dict[str, Any]:
        return {"kind": "random_low_rank", "rank": self.rank, "density": self.density,
                "k": self.k, "seed": self.seed, "layers": list(self.layers), "bytes": self.bytes,
                "hidden_size": self.hidden_size, "intermediate_size": self.n_neurons}
