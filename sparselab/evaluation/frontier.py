"""The bytes frontier: held-out quality against MLP weight bytes read, for every method.

    >>> from sparselab.prediction import methods as M
    >>> df = sl.frontier(model, tokenizer, [M.Oracle(0.5), M.Shadow(0.45), M.TEAL(0.7, 0.5)],
    ...                  held_out, train_trace=trace)
    >>> df[["method", "point", "bytes_share", "ppl_vs_dense"]]

Each :class:`~sparselab.prediction.selection.SelectionMethod` runs through
``sl.sparsify(model, method=...)`` on the same held-out texts (teacher-forced, one text at
a time, each truncated to ``max_length`` tokens) against the same dense pass. Bytes are
what the runtime counted from each token's selection: MLP weight bytes read per token over
all layers (the method's own weights included) as a share of the dense MLPs' bytes, so
gate, up and down are a third each. Methods not yet fitted are fitted on ``train_trace``
(training text only; the time it took is the ``fit_seconds`` column).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import pandas as pd
import torch

from sparselab.models import model_identity

__all__ = ["FRONTIER_COLUMNS", "frontier", "smallest_bytes"]

FRONTIER_COLUMNS = ("model", "method", "point", "realizable", "bytes_share", "perplexity",
                    "ppl_vs_dense", "kl", "greedy_agreement", "n_tokens", "fit_seconds")


def _fit_all(model, methods, train_trace) -> tuple[list, list[float]]:
    fitted, seconds = [], []
    for m in methods:
        if m.fitted:
            fitted.append(m)
            seconds.append(0.0)
            continue
        if train_trace is None:
            raise ValueError(f"method {m!r} needs fitting: pass train_trace= (a trace of training "
                             "text recorded with 'h', 'gate' and 'mlp_in')")
        t0 = time.perf_counter()
        fitted.append(m.fit(model, train_trace))
        seconds.append(time.perf_counter() - t0)
    return fitted, seconds


def frontier(
    model,
    tokenizer,
    methods: Sequence,
    texts: Sequence[str],
    *,
    train_trace=None,
    max_length: int = 256,
    model_name: str | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """One row per method and operating point (plus a dense row): bytes share, perplexity,
    perplexity vs dense, KL(dense || sparse) per token, greedy agreement (the share of
    positions whose most likely next token, teacher-forced, is dense's).

        >>> df = sl.frontier(model, tokenizer, M.default_methods(), held_out, train_trace=trace)

    ``texts`` must be held out from ``train_trace``. ``df.attrs`` holds the config (every
    method's description), the model identity and versions. Columns:
    :data:`FRONTIER_COLUMNS` (``ppl_vs_dense`` is ``perplexity / dense - 1``).
    """
    from tqdm.auto import tqdm

    from sparselab._version import versions
    from sparselab.evaluation.quality import _encode, _log_probs
    from sparselab.prediction.selection import SelectionMethod
    from sparselab.runtime.sparsify import sparsify

    methods = list(methods)
    bad = [type(m).__name__ for m in methods if not isinstance(m, SelectionMethod)]
    if bad:
        raise TypeError(f"methods must be SelectionMethods (sparselab.prediction.methods), got {bad}")
    if isinstance(texts, str) or not texts:
        raise ValueError("texts must be a non-empty list of strings (held-out passages)")
    fitted, fit_seconds = _fit_all(model, methods, train_trace)
    encoded = _encode(tokenizer, texts, max_length)

    k = len(fitted)
    nll, kl, agree = [0.0] * k, [0.0] * k, [0] * k
    read, dense_read = [0.0] * k, [0.0] * k
    dense_nll, n_tokens = 0.0, 0
    bar = tqdm(total=len(encoded) * (1 + k), desc="frontier", unit="pass", disable=not progress)
    with torch.no_grad():
        for ids in encoded:
            targets = ids[0, 1:, None]
            dense_lp = _log_probs(model, ids)
            bar.update()
            dense_p = dense_lp.exp()
            dense_top = dense_lp.argmax(-1)
            dense_nll -= float(dense_lp.gather(1, targets).sum())
            n_tokens += targets.shape[0]
            for i, m in enumerate(fitted):
                with sparsify(model, method=m, record_stats=False) as handle:
                    lp = _log_probs(model, ids)
                bar.update()
                nll[i] -= float(lp.gather(1, targets).sum())
                kl[i] += float((dense_p * (dense_lp - lp)).sum())
                agree[i] += int((lp.argmax(-1) == dense_top).sum())
                by_layer = handle.bytes_frame()
                read[i] += float((by_layer.bytes_per_token * by_layer.tokens).sum())
                dense_read[i] += float((by_layer.dense_bytes * by_layer.tokens).sum())
    bar.close()

    name = model_name or model_identity(model)["name"] or type(model).__name__
    dense_ppl = math.exp(dense_nll / n_tokens)
    rows = [{"model": name, "method": "dense", "point": "1", "realizable": True, "bytes_share": 1.0,
             "perplexity": dense_ppl, "ppl_vs_dense": 0.0, "kl": 0.0, "greedy_agreement": 1.0,
             "n_tokens": n_tokens,
             "fit_seconds": 0.0}]
    for i, m in enumerate(fitted):
        ppl = math.exp(nll[i] / n_tokens)
        rows.append({"model": name, "method": m.name, "point": m.point, "realizable": m.realizable,
                     "bytes_share": read[i] / dense_read[i], "perplexity": ppl,
                     "ppl_vs_dense": ppl / dense_ppl - 1.0, "kl": kl[i] / n_tokens,
                     "greedy_agreement": agree[i] / n_tokens,
                     "n_tokens": n_tokens, "fit_seconds": fit_seconds[i]})
    df = pd.DataFrame(rows, columns=list(FRONTIER_COLUMNS))
    df.attrs["config"] = {"methods": [m.describe() for m in fitted], "max_length": max_length,
                          "n_texts": len(encoded), "teacher_forced": True,
                          "fitted_on": None if train_trace is None else int(train_trace.n_tokens)}
    df.attrs["model"] = model_identity(model)
    df.attrs["versions"] = versions()
    return df


def smallest_bytes(df: pd.DataFrame, loss: float) -> pd.DataFrame:
    """Per model and method, the smallest bytes share among operating points within
    ``loss`` (e.g. 0.05 for +5 %) of dense perplexity (nan where none is).

        >>> smallest_bytes(df, 0.05)
    """
    rows = []
    for (model, method), g in df[df.method != "dense"].groupby(["model", "method"], sort=False):
        ok = g[g.ppl_vs_dense <= loss]
        rows.append({"model": model, "method": method, "loss": loss,
                     "bytes_share": float(ok.bytes_share.min()) if len(ok) else float("nan"),
                     "point": ok.loc[ok.bytes_share.idxmin(), "point"] if len(ok) else None})
    return pd.DataFrame(rows, columns=["model", "method", "loss", "bytes_share", "point"])
