"""The handle a sparsified model is restored with, and the statistics of its run.

    >>> with sl.sparsify(model, mode="oracle", rule=sl.rules.TopK(0.5)) as handle:
    ...     model(**batch)
    >>> handle.stats().head()          # one StepStats row per call and layer
"""

from __future__ import annotations

from typing import Any

import pandas as pd
from torch import nn

from sparselab.models import ModelAdapter
from sparselab.runtime.layout import untranspose_in_place
from sparselab.runtime.sparse_mlp import RunState, SparseMLP
from sparselab.runtime.stats import stats_frame
from sparselab.runtime.weight_file import restore_layer_weights

__all__ = ["SparseHandle"]


class SparseHandle:
    """What :func:`sparsify` returns: restores the dense model and holds the run's stats.

        >>> with sl.sparsify(model, mode="oracle", rule=sl.rules.TopK(0.5)) as h:
        ...     model(**batch)
        >>> h.stats().head()

    ``restore()`` is idempotent and also runs when a ``with`` block exits by an exception.
    """

    def __init__(self, model: nn.Module, adapter: ModelAdapter, runtime: RunState,
                 wrappers: dict[int, SparseMLP], hooks: list, config: dict[str, Any]) -> None:
        self.model = model
        self.adapter = adapter
        self._rt = runtime
        self.wrappers = wrappers
        self._hooks = hooks
        self.config = config
        self.post_restore: list = []  # callables run by restore() after the layout is back
        self.active = True

    # -- info ------------------------------------------------------------------------------
    @property
    def mode(self) -> str:
        return self._rt.mode

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(self.wrappers)

    @property
    def caches(self) -> dict[int, Any]:
        """Layer -> ``_fast.WeightCache`` (predicted mode with ``use_cache``)."""
        return {i: w.cache for i, w in self.wrappers.items() if w.cache is not None}

    @property
    def extra_bytes(self) -> int:
        """Bytes held beyond the dense model: the caches' active rows (down_t replaces down)."""
        return int(sum(c.capacity * 3 * c.hidden * c.dtype.itemsize for c in self.caches.values()))

    def __repr__(self) -> str:
        state = "active" if self.active else "restored"
        return f"SparseHandle(mode={self.mode!r}, layers={len(self.wrappers)}, {state})"

    # -- stats -----------------------------------------------------------------------------
    def stats(self) -> pd.DataFrame:
        """One row per forward call, layer (and batch row when ``union=False``).

        Columns: step (model forward call since sparsify/reset), layer, phase
        ("prefill"/"decode"), row (-1 = whole batch), n_tokens, active (neurons computed;
        mean per token for per-token prefill), density, added/removed (churn against the
        layer's previous mask), rows_copied/bytes_moved (cache or torch gather traffic),
        and nanoseconds in predictor, mask+union, cache update and MLP kernel.
        """
        df = stats_frame(self._rt.records)
        df.insert(0, "mode", self.mode)
        df.attrs["config"] = dict(self.config)
        return df

    def bytes_frame(self) -> pd.DataFrame:
        """Method mode: per layer, MLP weight bytes read per token and their share of the
        dense MLP's (columns layer, tokens, bytes_per_token, dense_bytes, bytes_share)."""
        rows = [{"layer": layer, "tokens": n, "bytes_per_token": total / max(n, 1),
                 "dense_bytes": dense, "bytes_share": total / max(n, 1) / dense}
                for layer, (total, n, dense) in sorted(self._rt.bytes_read.items())]
        return pd.DataFrame(rows, columns=["layer", "tokens", "bytes_per_token", "dense_bytes",
                                           "bytes_share"])

    def bytes_share(self) -> float:
        """Method mode: MLP weight bytes read per token over all sparsified layers, as a
        share of the dense MLPs' bytes (the method's own weights included); nan before
        any token ran."""
        df = self.bytes_frame()
        if df.empty or not df.tokens.sum():
            return float("nan")
        return float((df.bytes_per_token.sum()) / df.dense_bytes.sum())

    def reset_stats(self) -> None:
        """Forget recorded stats (and bytes read) and restart step numbering."""
        self._rt.bytes_read.clear()
        self._rt.records.clear()
        self._rt.step = -1

    # -- restore ---------------------------------------------------------------------------
    def restore(self) -> None:
        """Put the original MLP modules back (idempotent). The down weight becomes a
        contiguous tensor again, so dense logits are bit-identical to before."""
        if not self.active:
            return
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        scratch: list = []
        for i, wrapper in self.wrappers.items():
            spec = self.adapter.layers[i]
            if getattr(spec.layer, spec.attr) is wrapper:
                setattr(spec.layer, spec.attr, wrapper.original)
            if wrapper.down_t is not None:
                untranspose_in_place(spec.down_proj.weight, wrapper.down_t, scratch)
            elif wrapper.bundle is not None:
                restore_layer_weights(spec, self._rt.weight_file)
            wrapper.release()
        for fn in self.post_restore:  # after the down weights are back in their layout
            fn()
        self.post_restore.clear()
        self.active = False

    def __enter__(self) -> SparseHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.restore()

