"""sparselab: record, explore and exploit contextual activation sparsity in LLM MLPs.

    >>> import sparselab as sl
    >>> model, tokenizer = sl.load_model()            # embedded SmolLM2-135M, offline
    >>> trace = sl.record(model, tokenizer, sl.load_corpus(n=16), max_length=128)
    >>> masks = trace.masks(sl.rules.Calibrated(density=0.5))
    >>> sl.metrics.churn(masks).groupby("layer").churn.mean()

The package follows the two data flows (see the README's module map):
models -> recording -> masking -> metrics -> viz, and prediction -> runtime -> evaluation;
studies/ holds the analyses behind single notebooks, _fast/ the compiled core.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

from sparselab import _compat
from sparselab._version import __version__, versions
from sparselab.evaluation.quality import evaluate
from sparselab.masking import rules
from sparselab.masking.masks import Masks
from sparselab.models import load_model
from sparselab.models.corpus import load_corpus
from sparselab.prediction import Predictors, train_predictors
from sparselab.recording import Recorder, Trace, record
from sparselab.runtime import SparseHandle, sparsify

_compat.install()
# old module paths named like a public function: registered now, so that importing them
# never rebinds sl.record / sl.evaluate (the functions) to a module
for _old in ("sparselab.record", "sparselab.evaluate"):
    sys.modules.setdefault(_old, _compat.build(_old))

# subpackages and modules loaded on first use: plotly / ipywidgets / dask stay out of
# `import sparselab` for scripts that only record
_LAZY_MODULES = {
    "metrics": "sparselab.metrics",
    "figures": "sparselab.viz",
    "viz": "sparselab.viz",
    "models": "sparselab.models",
    "corpus": "sparselab.models.corpus",
    "masking": "sparselab.masking",
    "recording": "sparselab.recording",
    "prediction": "sparselab.prediction",
    "runtime": "sparselab.runtime",
    "evaluation": "sparselab.evaluation",
    "studies": "sparselab.studies",
    "testing": "sparselab.testing",
}
_LAZY_ATTRS = {
    "dashboard": ("sparselab.viz.dashboard", "dashboard"),
    "report": ("sparselab.viz.report", "report"),
    "frontier": ("sparselab.evaluation.frontier", "frontier"),
    "sweep": ("sparselab.studies.sweep", "sweep"),
}

__all__ = [
    "Masks",
    "Predictors",
    "Recorder",
    "SparseHandle",
    "Trace",
    "__version__",
    "evaluate",
    "frontier",
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
        return importlib.import_module(_LAZY_MODULES[name])
    if name in _LAZY_ATTRS:
        module, attr = _LAZY_ATTRS[name]
        return getattr(importlib.import_module(module), attr)
    old = f"sparselab.{name}"
    if old in _compat.MOVED or old in _compat.SPLIT:  # sl.bench, sl.hotset, ... (old names)
        return importlib.import_module(old)
    raise AttributeError(f"module 'sparselab' has no attribute {name!r}")
