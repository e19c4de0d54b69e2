"""Module paths of the flat layout (``sparselab.rules``, ``sparselab.bench``, ...) kept
importable after the package moved into subpackages.

    >>> from sparselab.rules import TopK          # == sparselab.masking.rules.TopK
    >>> import sparselab.bench as bench           # byte bound, timing, memory, comparisons

An old path whose concept moved whole is the new module itself (same object, so
``sparselab.rules is sparselab.masking.rules``). An old module whose concepts were split
is a small module holding the public names of the new ones, with the few renamed names
under their old spelling. Modules are made on first import (a meta-path finder), so
nothing heavy is imported until it is asked for.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types

# old module -> the new module it is now
MOVED: dict[str, str] = {
    "sparselab.corpus": "sparselab.models.corpus",
    "sparselab.record": "sparselab.recording.recorder",
    "sparselab.masks": "sparselab.masking.masks",
    "sparselab.rules": "sparselab.masking.rules",
    "sparselab.sweeps": "sparselab.masking.sweeps",
    "sparselab.magnitudes": "sparselab.masking.thresholds",
    "sparselab.figures": "sparselab.viz",
    "sparselab.figure_style": "sparselab.viz.style",
    "sparselab.figures_quality": "sparselab.viz.quality",
    "sparselab.figures_reuse": "sparselab.viz.reuse",
    "sparselab.figures_live": "sparselab.viz.live",
    "sparselab.figures_kernels": "sparselab.viz.kernels",
    "sparselab.interact": "sparselab.viz.interact",
    "sparselab.report_html": "sparselab.viz.report",
    "sparselab.live": "sparselab.runtime.generate",
    "sparselab.kernel_bench": "sparselab.evaluation.kernel_bench",
    "sparselab.heap": "sparselab._heap",
    "sparselab.calibration": "sparselab.studies.calibration",
    "sparselab.contextual": "sparselab.studies.contextual",
    "sparselab.residual": "sparselab.studies.residual",
    "sparselab.predictor_study": "sparselab.studies.predictor_study",
    "sparselab.hotset": "sparselab.studies.hotset",
    "sparselab.independence": "sparselab.studies.independence",
}

# old module -> (new modules whose public names it holds, {old name: "module:new name"})
SPLIT: dict[str, tuple[tuple[str, ...], dict[str, str]]] = {
    "sparselab.trace": (("sparselab.recording.trace", "sparselab.recording.trace_file"), {}),
    "sparselab.bits": (("sparselab._fast.masks",), {
        "pack_bits": "sparselab._fast.masks:pack",
        "unpack_bits": "sparselab._fast.masks:unpack",
    }),
    "sparselab.predictors": (
        ("sparselab.prediction.lowrank", "sparselab.prediction.training", "sparselab.prediction.policy",
         "sparselab.prediction.files", "sparselab.prediction.identity", "sparselab.prediction.scoring"),
        {
            "mass_kept": "sparselab.prediction.scoring:mass_share",
            "energy_kept": "sparselab.prediction.scoring:energy_share",
            "oracle_mass_kept": "sparselab.prediction.scoring:oracle_mass_share",
            "QUANTILES": "sparselab.masking.thresholds:QUANTILES",
            "quantile_grid": "sparselab.masking.thresholds:quantile_grid",
            "threshold_from_quantiles": "sparselab.masking.thresholds:threshold_from_quantiles",
            "top_k_mask": "sparselab.masking.thresholds:top_k_mask",
        },
    ),
    "sparselab.sparse": (
        ("sparselab.runtime.sparsify", "sparselab.runtime.handle", "sparselab.runtime.sparse_mlp",
         "sparselab.runtime.stats", "sparselab.prediction.static"),
        {
            "MODES": "sparselab.runtime.sparsify:SPARSIFY_MODES",
            "predictors_at_density": "sparselab.prediction.protocol:at_density",
        },
    ),
    "sparselab.evaluate": (("sparselab.evaluation.quality",), {
        "MODES": "sparselab.evaluation.quality:EVALUATION_MODES",
    }),
    "sparselab.bench": (
        ("sparselab.evaluation.byte_bound", "sparselab.evaluation.memory", "sparselab.evaluation.timing",
         "sparselab.evaluation.compare", "sparselab.evaluation.summaries", "sparselab.prediction.random"),
        {"Factory": "sparselab.evaluation.compare:Factory",
         "STAT_PARTS": "sparselab.evaluation.timing:STAT_PARTS",
         "GAP_PARTS": "sparselab.evaluation.summaries:GAP_PARTS",
         "SUMMARY_METRICS": "sparselab.evaluation.summaries:SUMMARY_METRICS"},
    ),
    "sparselab.bench_suite": (("sparselab.evaluation.suite", "sparselab.evaluation.suite_report"), {
        "build_random_llama": "sparselab.models.random:build_random_llama",
        "full_model_bytes": "sparselab.evaluation.suite:full_model_bytes",
        "predictor_cache_key": "sparselab.evaluation.suite:predictor_cache_key",
        "PREDICTOR_CACHE_VERSION": "sparselab.evaluation.suite:PREDICTOR_CACHE_VERSION",
    }),
    "sparselab.dashboard_app": (("sparselab.viz.dashboard",), {}),
}


def _public(module: types.ModuleType) -> dict[str, object]:
    names = getattr(module, "__all__", None)
    if names is None:
        names = [n for n in vars(module) if not n.startswith("_")]
    return {n: getattr(module, n) for n in names}


def _resolve(target: str) -> object:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def build(old: str) -> types.ModuleType:
    """The module an old path stands for (imports its new modules)."""
    if old in MOVED:
        return importlib.import_module(MOVED[old])
    sources, renamed = SPLIT[old]
    module = types.ModuleType(old, f"Old path of {', '.join(sources)} (kept importable).")
    for source in sources:
        vars(module).update(_public(importlib.import_module(source)))
    for name, target in renamed.items():
        setattr(module, name, _resolve(target))
    module.__all__ = sorted(n for n in vars(module) if not n.startswith("_"))
    return module


class _OldPathLoader(importlib.abc.Loader):
    def create_module(self, spec):
        return build(spec.name)

    def exec_module(self, module) -> None:  # built complete in create_module
        pass


class OldPathFinder(importlib.abc.MetaPathFinder):
    """Finds the modules of :data:`MOVED` and :data:`SPLIT` (and nothing else)."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname in MOVED or fullname in SPLIT:
            return importlib.machinery.ModuleSpec(fullname, _OldPathLoader())
        return None


def install() -> None:
    """Put :class:`OldPathFinder` on ``sys.meta_path`` (once)."""
    if not any(isinstance(f, OldPathFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, OldPathFinder())
