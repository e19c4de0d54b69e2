"""One global threshold vs per-layer calibrated thresholds (TEAL, CATS).

    >>> fits = sl.studies.calibration.threshold_rules(trace, densities=(0.3, 0.5), source="h")
    >>> fits["uniform"][0.5].thresholds[0] == fits["uniform"][0.5].thresholds[29]   # one tau
    True
    >>> sl.studies.calibration.layer_densities(trace, fits).groupby(["scheme", "layer"]).density.mean()

Activation magnitudes differ by an order of magnitude between the first and the last
layers of a model, so a single threshold ``tau`` chosen to give an *overall* density
(all layers together) keeps almost nothing in some layers and almost everything in
others. TEAL (on ``|h|``) and CATS (on ``|act(gate)|``) calibrate one threshold per layer
instead, each layer's ``1 - density`` quantile. Both schemes are expressed here as fitted
rules of :mod:`sparselab.masking.rules` (``Calibrated`` for ``h``, ``GateThreshold`` for
``gate``): the uniform one simply holds the same threshold for every layer, so either can
go to ``sl.sparsify(mode="oracle", rule=...)`` or :func:`sparselab.evaluate`.

Everything is computed from a :class:`sparselab.masking.thresholds.MagnitudeIndex` of the
recorded magnitudes (exact order statistics of the fp16 recording, one pass over the
data), so sweeps over densities cost almost nothing beyond that pass.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from sparselab._checks import check_choice, check_fraction, check_fractions
from sparselab.masking import rules
from sparselab.masking.sweeps import calibrated_rules
from sparselab.masking.thresholds import MagnitudeIndex

__all__ = [
    "QUANTILES",
    "SCHEMES",
    "density_spread",
    "layer_densities",
    "magnitude_quantiles",
    "mode_name",
    "threshold_quality",
    "threshold_rules",
    "uniform_threshold",
]

SCHEMES = ("uniform", "calibrated")
QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9, 0.99)
_KINDS = {"h": rules.Calibrated, "gate": rules.GateThreshold}


def _index(trace, source: str) -> MagnitudeIndex:
    check_choice("source", source, tuple(_KINDS))
    if source not in trace.arrays:
        raise KeyError(f"{source!r} was not recorded (recorded: {sorted(trace.arrays)})")
    return MagnitudeIndex(trace.arrays[source])


def magnitude_quantiles(
    trace, sources: Sequence[str] = ("h", "gate"), quantiles: Sequence[float] = QUANTILES
) -> pd.DataFrame:
    """Quantiles of ``|h|`` and ``|act(gate)|`` per layer, over all tokens and neurons.

        >>> q = sl.studies.calibration.magnitude_quantiles(trace)
        >>> q[(q.source == "h") & (q.quantile == 0.5)].set_index("layer").value

    Exact order statistics (no interpolation). Columns: ``source, layer, quantile,
    value``.
    """
    qs = [float(q) for q in quantiles]
    if not qs or any(not 0.0 <= q <= 1.0 for q in qs):
        raise ValueError(f"quantiles must be a non-empty list of values in [0, 1], got {qs}")
    rows = []
    for source in sources:
        index = _index(trace, source)
        for i, layer in enumerate(trace.layers):
            rows += [{"source": source, "layer": layer, "quantile": q, "value": index.quantile(i, q)} for q in qs]
    return _attrs(pd.DataFrame(rows), trace, sources=list(sources), quantiles=qs)


def uniform_threshold(trace, density: float, source: str = "h") -> float:
    """One threshold ``tau`` for all layers with an overall share ``density`` of values above it.

        >>> tau = sl.studies.calibration.uniform_threshold(trace, 0.5)
        >>> np.mean([(trace.activations(l).abs() > tau).float().mean() for l in trace.layers])

    Every layer holds the same number of values, so the overall share is the mean of the
    layers' shares; it falls as ``tau`` grows, and ``tau`` is found by bisection (with fp16
    data the share is a step function, so the result is exact up to ties).
    """
    density = check_fraction("density", density)
    return _uniform_threshold(_index(trace, source), trace.n_layers, density)


def _uniform_threshold(index, n_layers: int, density: float, iterations: int = 80) -> float:
    def share(tau: float) -> float:
        return float(np.mean([index.share_above(i, tau) for i in range(n_layers)]))

    if share(0.0) <= density:  # exact zeros are never above; keep everything nonzero
        return -np.inf if density >= 1.0 else 0.0
    lo, hi = 0.0, max(index.quantile(i, 1.0) for i in range(n_layers))
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        if share(mid) > density:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-7 * max(hi, 1e-30):
            break
    # hi: the smallest tau found whose share is <= density (never more than asked for)
    return float(hi)


def threshold_rules(
    trace, densities: Sequence[float], source: str = "h", schemes: Sequence[str] = SCHEMES
) -> dict[str, dict[float, rules.Calibrated]]:
    """Fitted rules ``{scheme: {density: rule}}``: one global threshold or one per layer.

        >>> fits = threshold_rules(train_trace, (0.3, 0.5), source="gate")   # CATS
        >>> sl.sparsify(model, mode="oracle", rule=fits["calibrated"][0.5])

    - ``"uniform"``: the same ``tau`` in every layer, chosen so that all layers together
      keep a share ``density`` of the values (:func:`uniform_threshold`);
    - ``"calibrated"``: each layer's own ``1 - density`` quantile (identical to
      ``sl.rules.Calibrated(density).fit(trace)``, or ``GateThreshold`` for ``"gate"``).

    Both are ``Calibrated`` / ``GateThreshold`` rules with a thresholds dict, so they
    mask any other trace or live activations the same way.
    """
    unknown = [s for s in schemes if s not in SCHEMES]
    if unknown:
        raise ValueError(f"unknown schemes {unknown}; expected any of {SCHEMES}")
    values = check_fractions("densities", densities)
    index = _index(trace, source)
    kind = _KINDS[source]
    out: dict[str, dict[float, rules.Calibrated]] = {}
    for scheme in schemes:
        if scheme == "calibrated":  # the one per-layer calibration of the library
            out[scheme] = calibrated_rules(trace, values, source, index)
            continue
        out[scheme] = {}
        for d in values:
            tau = _uniform_threshold(index, trace.n_layers, d)
            out[scheme][d] = kind(density=d, thresholds=dict.fromkeys(trace.layers, tau))
    return out


def _by_scheme(fits: Mapping) -> list[Mapping[str, Mapping[float, rules.Rule]]]:
    """``{scheme: {density: rule}}`` mappings of ``fits``, which may also be keyed by source first."""
    nested = [v for v in fits.values() if isinstance(v, Mapping)]
    if nested and all(isinstance(x, Mapping) for v in nested for x in v.values()):
        return list(fits.values())  # {source: {scheme: {density: rule}}}
    return [fits]


def layer_densities(trace, fits: Mapping) -> pd.DataFrame:
    """Share of each layer's values that each fitted rule keeps, measured on ``trace``.

        >>> df = layer_densities(held_out_trace, threshold_rules(train_trace, (0.5,)))
        >>> df.pivot_table(index="layer", columns="scheme", values="density")

    ``fits``: ``{scheme: {target density: rule}}`` as returned by :func:`threshold_rules`
    (possibly fitted on another trace: then this measures how well thresholds transfer),
    or ``{source: {scheme: {target density: rule}}}`` for several sources.
    Columns: ``scheme, source, target_density, layer, threshold, density``.
    """
    groups = _by_scheme(fits)
    if len(groups) > 1 or groups[0] is not fits:
        frames = [layer_densities(trace, group) for group in groups]
        return _attrs(pd.concat(frames, ignore_index=True), trace, sources=list(fits))
    indexes: dict[str, object] = {}
    rows = []
    for scheme, by_density in fits.items():
        for target, rule in by_density.items():
            thresholds = getattr(rule, "thresholds", None)
            if not thresholds:
                raise ValueError(f"{scheme} rule at density {target} has no per-layer thresholds (fit it first)")
            missing = sorted(set(trace.layers) - set(thresholds))
            if missing:
                raise ValueError(f"{scheme} rule at density {target} has no threshold for layers {missing}")
            if rule.source not in indexes:
                indexes[rule.source] = _index(trace, rule.source)
            index = indexes[rule.source]
            for i, layer in enumerate(trace.layers):
                tau = float(thresholds[layer])
                rows.append({"scheme": scheme, "source": rule.source, "target_density": float(target),
                             "layer": layer, "threshold": tau, "density": index.share_above(i, tau)})
    return _attrs(pd.DataFrame(rows), trace, schemes=list(fits))


def density_spread(layers: pd.DataFrame) -> pd.DataFrame:
    """Per scheme and target: overall density (mean over layers) and the spread across layers.

        >>> density_spread(layer_densities(trace, fits))

    ``layers``: frame of :func:`layer_densities`. Columns: ``scheme, source,
    target_density, overall_density, min_density, max_density, std_density``.
    """
    keys = ["scheme", "source", "target_density"]
    missing = [c for c in [*keys, "density"] if c not in layers.columns]
    if missing:
        raise ValueError(f"density_spread needs columns {missing}; got {list(layers.columns)}")
    out = layers.groupby(keys, sort=False).density.agg(
        overall_density="mean", min_density="min", max_density="max", std_density=lambda s: float(np.std(s))
    ).reset_index()
    out.attrs = dict(layers.attrs)
    return out


def _attrs(df: pd.DataFrame, trace, **config) -> pd.DataFrame:
    from sparselab._version import versions

    df.attrs["config"] = {**config, "n_tokens": trace.n_tokens, "layers": list(trace.layers)}
    df.attrs["model"] = trace.meta.get("model", {})
    df.attrs["versions"] = versions()
    return df


def mode_name(scheme: str, source: str) -> str:
    """Name of a (scheme, source) pair in quality frames and figure legends: ``"uniform (h)"``."""
    return f"{scheme} ({source})"


def threshold_quality(
    model,
    tokenizer,
    texts: Sequence[str],
    fits: Mapping[str, Mapping[str, Mapping[float, rules.Rule]]],
    max_length: int = 128,
    measure_on=None,
    progress: bool = True,
    **evaluate_kwargs,
) -> pd.DataFrame:
    """Perplexity and KL to dense of every scheme, source and density on held-out ``texts``.

        >>> fits = {s: threshold_rules(train_trace, (0.3, 0.5), source=s) for s in ("h", "gate")}
        >>> df = threshold_quality(model, tokenizer, test[:4], fits, measure_on=test_trace)
        >>> df.pivot(index="density", columns="mode", values="perplexity")

    ``fits``: ``{source: {scheme: {density: rule}}}`` (:func:`threshold_rules` per
    source), all over the same densities. One :func:`sparselab.evaluate` call scores every
    rule in oracle mode (each token's true mask under the rule) against one dense pass
    per text; modes are named by :func:`mode_name`. With ``measure_on`` (a trace of the
    same held-out texts), ``overall_density`` is the share of neurons each rule really
    kept there (mean over layers), so schemes are compared at the density they reached,
    not only the one they aimed at. Extra columns: ``scheme, source, overall_density``.
    """
    from sparselab.evaluation.quality import evaluate

    if not fits:
        raise ValueError("give the fitted rules of at least one source")
    grids = {(source, scheme): sorted(float(d) for d in by_density)
             for source, by_scheme in fits.items() for scheme, by_density in by_scheme.items()}
    densities = next(iter(grids.values()))
    if any(grid != densities for grid in grids.values()):
        raise ValueError(f"every scheme and source must cover the same densities, got {grids}")
    extra = {}
    for source, by_scheme in fits.items():
        for scheme, by_density in by_scheme.items():
            lookup = {float(d): rule for d, rule in by_density.items()}
            extra[mode_name(scheme, source)] = lambda d, lookup=lookup: {"mode": "oracle", "rule": lookup[d]}
    evaluate_kwargs.setdefault("n_generate", 0)
    df = evaluate(model, tokenizer, texts, densities=densities, modes=("dense",), max_length=max_length,
                  progress=progress, extra_modes=extra, **evaluate_kwargs)
    names = {mode_name(scheme, source): (scheme, source) for source, by in fits.items() for scheme in by}
    df["scheme"] = df["mode"].map(lambda m: names.get(m, ("dense", None))[0])
    df["source"] = df["mode"].map(lambda m: names.get(m, (None, None))[1])
    if measure_on is not None:
        spread = density_spread(layer_densities(measure_on, fits))
        overall = {(mode_name(r.scheme, r.source), float(r.target_density)): r.overall_density
                   for r in spread.itertuples()}
        df["overall_density"] = [1.0 if m == "dense" else overall[(m, float(d))]
                                 for m, d in zip(df["mode"], df["density"], strict=True)]
    df.attrs["config"] = {**df.attrs.get("config", {}), "schemes": sorted(extra),
                          "measured_on_tokens": None if measure_on is None else measure_on.n_tokens}
    return df
