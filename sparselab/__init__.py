"""sparselab: record, explore and exploit contextual activation sparsity in LLM MLPs.

    >>> import sparselab as sl
    >>> model, tokenizer = sl.load_model()            # embedded SmolLM2-135M, offline
    >>> trace = sl.record(model, tokenizer, sl.load_corpus(n=16), max_length=128)
    >>> masks = trace.masks(sl.rules.Calibrated(density=0.5))
    >>> sl.metrics.churn(masks).groupby("layer").churn.mean()
"""

from __future__ import annotations

import importlib
from typing import Any

from sparselab import rules
from sparselab._version import __version__, versions
from sparselab.corpus import load_corpus
from sparselab.evaluate import evaluate  # binds sl.evaluate to the function, not the module
from sparselab.masks import Masks
from sparselab.models import load_model
from sparselab.predictors import Predictors, train_predictors
from sparselab.record import Recorder, record
from sparselab.sparse import SparseHandle, sparsify
from sparselab.trace import Trace

# submodules that import plotly/ipywidgets are loaded on first use, keeping `import
# sparselab` fast for scripts that only record
_LAZY_MODULES = {
    "metrics", "figures", "dashboard_app", "report_html", "models", "corpus", "independence",
    "hotset", "sweeps", "interact", "figures_reuse", "figures_kernels", "predictors", "sparse",
    "bench", "live", "figures_live", "calibration", "contextual", "residual", "predictor_study",
    "figures_quality",
}
_LAZY_ATTRS = {
    "dashboard": ("sparselab.dashboard_app", "dashboard"),
    "report": ("sparselab.report_html", "report"),
}

__all__ = [
    "Masks",
    "Predictors",
    "Recorder",
    "SparseHandle",
    "Trace",
    "__version__",
    "evaluate",
    "load_corpus",
    "load_model",
    "record",
    "rules",
    "sparsify",
    "train_predictors",
    "versions",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY_MODULES:
        return importlib.import_module(f"sparselab.{name}")
    if name in _LAZY_ATTRS:
        module, attr = _LAZY_ATTRS[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'sparselab' has no attribute {name!r}")
