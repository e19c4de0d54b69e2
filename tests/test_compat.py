"""Every public name of the flat layout still imports from its old module path.

The package moved into subpackages (models, recording, masking, metrics, viz, prediction,
runtime, evaluation, studies); notebooks, experiments and users' code written against the
old paths keep working through :mod:`sparselab._compat`.
"""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import sparselab as sl

# module -> the public names it defined before the restructuring (frozen list)
OLD_PUBLIC_NAMES = {
    "sparselab.bench": (
        "DecodeBytes", "Factory", "GAP_PARTS", "GenerationTiming", "MB", "MemorySampler",
        "RandomLowRankPredictors", "STAT_PARTS", "SUMMARY_METRICS", "bound_curve", "byte_bound",
        "check_targets", "compare", "decode_bytes", "decode_bytes_from_config", "decode_split",
        "headline", "release_memory", "rss_bytes", "shortfall", "speedups", "split_table",
        "summarize", "time_generate",
    ),
    "sparselab.bench_suite": (
        "DEFAULTS", "PREDICTOR_CACHE_VERSION", "Setup", "VARIANTS", "analyse",
        "build_random_llama", "check_config", "full_model_bytes", "load_config", "machine_info",
        "make_prompt", "measure", "predictor_cache_key", "prepare", "report",
        "trained_predictors", "variant_factories", "write_results",
    ),
    "sparselab.bits": (
        "WORD_BITS", "n_words", "pack_bits", "popcount", "unpack_bits",
    ),
    "sparselab.calibration": (
        "QUANTILES", "SCHEMES", "density_spread", "layer_densities", "magnitude_quantiles",
        "mode_name", "threshold_quality", "threshold_rules", "uniform_threshold",
    ),
    "sparselab.contextual": (
        "LABELS", "contextual_vs_static", "mass_kept_by_mode", "random_mode", "random_sets",
    ),
    "sparselab.corpus": (
        "CORPORA", "load_corpus", "split",
    ),
    "sparselab.dashboard_app": (
        "Dashboard", "RULE_NAMES", "TABS", "WINDOWS", "dashboard",
    ),
    "sparselab.evaluate": (
        "COLUMNS", "MODES", "evaluate",
    ),
    "sparselab.figure_style": (
        "ACTIVE_COLOR", "BASELINE_DASH", "HIGHLIGHT_COLOR", "LAYER_SCALE", "TEMPLATE", "hline",
        "layer_colors", "new_figure", "one_layer", "require_columns", "select_layers",
        "template", "unstyled",
    ),
    "sparselab.figures": (
        "activation_magnitude_by_layer", "batch_union_curves", "churn_over_tokens",
        "density_by_layer", "neuron_frequency_cdf", "token_heatmap", "window_reuse_curves",
    ),
    "sparselab.figures_kernels": (
        "METHOD_NAMES", "REGATHER_COLOR", "mlp_time_vs_density", "update_cost",
    ),
    "sparselab.figures_live": (
        "COMPONENT_COLORS", "QUALITY_COLUMNS", "cache_traffic_bars", "predictor_quality",
        "step_heatmap", "step_layer_density", "time_split_bars",
    ),
    "sparselab.figures_quality": (
        "DENSE_COLOR", "PREDICTOR_METRICS", "SCHEME_DASH", "SOURCE_COLORS", "SOURCE_TITLES",
        "calibration_overview", "cosine_by_layer", "layer_density_spread", "lookahead_recall",
        "magnitude_quantiles", "mass_kept_by_layer", "predictor_metrics", "predictor_vs_rank",
        "quality_vs_density",
    ),
    "sparselab.figures_reuse": (
        "FREQUENCY_DOT", "LOG2_TICKS", "MODEL_COLOR", "UNIFORM_COLOR", "aggregated_sparsity",
        "frequency_ecdf", "hit_rate_by_layer", "hit_rate_curves", "union_by_layer",
        "union_comparison_curves", "window_reuse_vs_models",
    ),
    "sparselab.heap": (
        "trim_heap",
    ),
    "sparselab.hotset": (
        "held_out_masks", "hit_rate", "hot_neurons",
    ),
    "sparselab.independence": (
        "frequency_model", "neuron_frequencies", "union_comparison",
    ),
    "sparselab.interact": (
        "LinkedFigure", "linked_figure",
    ),
    "sparselab.kernel_bench": (
        "CHURNS", "DENSITIES", "Rows", "SHAPES", "TARGET_SHAPE", "bench_mask_ops", "bench_mlp",
        "bench_update", "interleaved", "mlp_methods", "random_mask", "regather_fn", "stats_ms",
        "swap", "toggler", "update_sweep",
    ),
    "sparselab.live": (
        "COMPONENTS", "LiveResult", "OTHER", "available_modes", "cache_traffic",
        "sparse_generate", "time_split",
    ),
    "sparselab.magnitudes": (
        "MagnitudeIndex",
    ),
    "sparselab.masks": (
        "Masks",
    ),
    "sparselab.metrics": (
        "activation_magnitude", "batch_union", "churn", "density", "mass_kept",
        "neuron_frequency", "sample_batches", "sequence_order", "summary", "window_reuse",
    ),
    "sparselab.models": (
        "ACTIVATIONS", "DEFAULT_MODEL", "LayerMLP", "ModelAdapter", "SUPPORTED",
        "UnsupportedModelError", "adapter_for", "cache_dir", "embedded_gguf_path",
        "embedded_model_dir", "load_model", "model_identity",
    ),
    "sparselab.predictor_study": (
        "INPUTS", "predictor_sweep", "random_baseline",
    ),
    "sparselab.predictors": (
        "CONFIG_FILE", "FORMAT", "FORMAT_VERSION", "IDENTITY_KEYS", "LOSSES", "LowRankFit",
        "Policy", "PredictorFileError", "PredictorModelMismatch", "Predictors", "QUANTILES",
        "WEIGHTS_FILE", "energy_kept", "fit_low_rank", "mass_kept", "oracle_mass_kept",
        "quantile_grid", "resolve_rank", "split_sequences", "threshold_from_quantiles",
        "top_k_mask", "train_predictors",
    ),
    "sparselab.record": (
        "Recorder", "record",
    ),
    "sparselab.report_html": (
        "report",
    ),
    "sparselab.residual": (
        "input_cosine", "residual_cosine", "summarize_cosine",
    ),
    "sparselab.rules": (
        "Calibrated", "GateThreshold", "MassCoverage", "RULES", "Rule", "Threshold", "TopK",
        "apply_rule", "layer_threshold", "rule_from_dict",
    ),
    "sparselab.sparse": (
        "AlreadySparsifiedError", "KERNELS", "MODES", "PREFILLS", "STAT_COLUMNS", "SparseHandle",
        "SparseMLP", "is_sparsified", "predictors_at_density", "sparsify", "static_from_trace",
    ),
    "sparselab.sweeps": (
        "calibrated_masks", "calibrated_rules",
    ),
    "sparselab.trace": (
        "ARRAYS", "FORMAT", "FORMAT_VERSION", "TOKEN_FIELDS", "Trace", "TraceFileError",
    ),
}


@pytest.mark.parametrize("module", sorted(OLD_PUBLIC_NAMES))
def test_every_old_public_name_imports_from_its_old_path(module):
    mod = importlib.import_module(module)
    missing = [name for name in OLD_PUBLIC_NAMES[module] if not hasattr(mod, name)]
    assert not missing, f"{module} lost {missing}"


def test_moved_modules_are_the_new_modules_themselves():
    import sparselab.rules

    import sparselab.masking.rules
    import sparselab.viz

    assert sparselab.rules is sparselab.masking.rules
    assert importlib.import_module("sparselab.figures") is sparselab.viz
    from sparselab.bench import RandomLowRankPredictors

    from sparselab.prediction import RandomLowRankPredictors as new

    assert RandomLowRankPredictors is new


def test_old_module_names_never_shadow_the_public_functions():
    import sparselab.evaluate  # noqa: F401
    import sparselab.record  # noqa: F401

    assert callable(sl.record) and callable(sl.evaluate)
    assert sl.record.__module__ == "sparselab.recording.recorder"


def test_renamed_names_keep_their_old_spelling():
    from sparselab.predictors import mass_kept
    from sparselab.sparse import MODES

    from sparselab.prediction.scoring import mass_share
    from sparselab.runtime.sparsify import SPARSIFY_MODES

    assert mass_kept is mass_share and MODES == SPARSIFY_MODES
    assert MODES[:3] == ("predicted", "oracle", "static")  # the old modes keep their places


def test_import_sparselab_stays_light():
    """Recording needs no plotly, ipywidgets or dask: they load on first use of viz."""
    code = ("import sys, sparselab; heavy = [m for m in ('plotly', 'ipywidgets', 'dask') "
            "if m in sys.modules]; print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
