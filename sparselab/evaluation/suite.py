"""Benchmark suites from JSON configs: prepare a model and predictors, run dense and sparse
variants alternately, analyse against the byte bound, write JSON / CSV / Markdown.

    >>> from sparselab.evaluation import suite
    >>> config = suite.load_config("experiments/configs/smollm2_135m.json")
    >>> setup = suite.prepare(config, threads=1)
    >>> result, runs = suite.measure(setup, num_runs=5)
    >>> print(suite_report.report(result, runs))

``experiments/run_benchmark.py`` is the command line around this module; notebook 10 uses
it directly. A config names the model, the predictors, the MLP density, the prompt and the
run sizes (see ``experiments/configs/*.json``):

- ``model.kind = "embedded"``: the embedded SmolLM2-135M (``sl.load_model()``) with
  predictors trained on a recording of the corpus' training split on first use and cached
  under ``sparselab.models.cache_dir()/predictors/<hash of what they depend on>``;
- ``model.kind = "random_llama"``: a ``LlamaForCausalLM`` of the given shapes with random
  weights (nothing downloaded; decode speed does not depend on the values) and
  :class:`sparselab.prediction.RandomLowRankPredictors` keeping a fixed share of neurons.

Variants ``dense``, ``sparse_cache`` (predictor -> mask -> ``WeightCache`` -> kernel) and
``sparse_direct`` (index-list kernel over the full weights, no cache) run alternately in
one process (:func:`sparselab.evaluation.compare.compare`). ``predictors.kind = "method"``
benchmarks a selection method instead (``predictors.method``: ``{"name": "shadow", ...}``,
the :class:`~sparselab.prediction.methods.Shadow` fields, fitted on training text) as
variant ``sparse_method``: ``sl.sparsify(model, method=..., kernel="fast")``, whose decode
steps run the method's compiled selection then the by-index kernel; its prompt runs
per token (each token's selection, as the frontier measures) or dense with the config's
``"prefill": "dense"``.

Reference variants (timed beside the others, never judged against a target):
``dense_kernel``, the dense MLP through the same by-index kernel (every neuron), which
separates what sparsity gains from what the kernel gains over torch's dense MLP on this
CPU; ``dense_float``, the float model beside an int8 dense baseline.

After loading, every parameter is collapsed to 2 MiB pages
(:func:`~sparselab._fast.pages.use_huge_pages`), so every variant runs on the same kind of
pages; ``SPARSELAB_HUGE_PAGES=0`` keeps 4 KiB pages throughout.
"""

from __future__ import annotations

import copy
import gc
import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from sparselab._fast.pages import use_huge_pages
from sparselab._fast.quant import INT8_FORMATS
from sparselab._version import versions
from sparselab.evaluation.byte_bound import (
    DecodeBytes,
    decode_bytes,
    decode_bytes_from_config,
    with_int8_mlp,
)
from sparselab.evaluation.compare import compare
from sparselab.evaluation.memory import release_memory, rss_bytes
from sparselab.evaluation.suite_report import machine_info
from sparselab.evaluation.summaries import (
    check_targets,
    shortfall,
    speedups,
    split_table,
    summarize,
)
from sparselab.masking.rules import rule_from_dict
from sparselab.models import adapter_for, cache_dir, load_model, model_identity
from sparselab.models.corpus import load_corpus, split
from sparselab.models.random import build_random_llama
from sparselab.prediction import (
    PredictorFileError,
    Predictors,
    RandomLowRankPredictors,
    train_predictors,
)
from sparselab.recording.recorder import record
from sparselab.runtime.sparsify import WEIGHT_FORMATS, sparsify

__all__ = ["DEFAULTS", "VARIANTS", "Setup", "analyse", "build_random_llama", "check_config",
           "load_config", "make_prompt", "measure", "prepare", "trained_predictors",
           "variant_factories"]


VARIANTS = ("dense", "sparse_cache", "sparse_direct", "sparse_method", "dense_float", "dense_kernel")
METHODS = ("shadow",)
PREDICTOR_CACHE_VERSION = 1  # bump when the training recipe below changes

DEFAULTS: dict[str, Any] = {
    "density": 0.5,
    "max_new_tokens": 32,
    "warmup_runs": 2,
    "num_runs": 10,
    "threads": None,
    "variants": ["dense", "sparse_cache", "sparse_direct"],
    "weights": "model",
    "prefill": None,  # the library's default: dense, but per token for a method
    "memory_interval_s": 0.002,
    "prompt": {"kind": "corpus", "index": 0, "tokens": 64},
}


# --------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------


def load_config(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check a benchmark config; missing top-level keys take :data:`DEFAULTS`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no benchmark config at {path} (see experiments/configs/)")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    config = {**copy.deepcopy(DEFAULTS), **raw}
    config.setdefault("name", path.stem)
    check_config(config)
    return config


def check_config(config: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming the first thing wrong with ``config``."""
    model = config.get("model") or {}
    kind = model.get("kind")
    if kind not in ("embedded", "random_llama"):
        raise ValueError(f"model.kind must be 'embedded' or 'random_llama', got {kind!r}")
    if kind == "random_llama" and not isinstance(model.get("llama_config"), dict):
        raise ValueError("model.kind 'random_llama' needs a 'llama_config' dict of LlamaConfig fields")
    pred = config.get("predictors") or {}
    if pred.get("kind") not in ("trained", "random_low_rank", "method"):
        raise ValueError(f"predictors.kind must be 'trained', 'random_low_rank' or 'method', "
                         f"got {pred.get('kind')!r}")
    if pred["kind"] in ("trained", "method") and kind != "embedded":
        raise ValueError(f"{pred['kind']} predictors need a real model and text: use model.kind 'embedded'")
    if pred["kind"] == "method":
        if (pred.get("method") or {}).get("name") not in METHODS:
            raise ValueError(f"predictors.method.name must be one of {METHODS}, got {pred.get('method')!r}")
    elif "rank" not in pred:
        raise ValueError("predictors.rank is required (an int, or a float fraction of the intermediate size)")
    d = config["density"]
    if not (isinstance(d, (int, float)) and 0.0 < d <= 1.0):
        raise ValueError(f"density must be in (0, 1], got {d!r}")
    prompt = config["prompt"]
    if prompt.get("kind") not in ("corpus", "random"):
        raise ValueError(f"prompt.kind must be 'corpus' or 'random', got {prompt.get('kind')!r}")
    if prompt["kind"] == "corpus" and kind != "embedded":
        raise ValueError("a corpus prompt needs a tokenizer: use prompt.kind 'random' with a random model")
    if int(prompt.get("tokens", 0)) < 1:
        raise ValueError(f"prompt.tokens must be >= 1, got {prompt.get('tokens')!r}")
    for key, low in (("max_new_tokens", 2), ("num_runs", 1), ("warmup_runs", 0)):
        if not isinstance(config[key], int) or config[key] < low:
            raise ValueError(f"{key} must be an int >= {low}, got {config[key]!r}")
    unknown = [v for v in config["variants"] if v not in VARIANTS]
    if unknown or "dense" not in config["variants"]:
        raise ValueError(f"variants must include 'dense' and come from {VARIANTS}, got {config['variants']}")
    is_method = pred["kind"] == "method"
    if (is_method and not set(config["variants"]) <= {"dense", "sparse_method", "dense_kernel"}) or (
            not is_method and "sparse_method" in config["variants"]):
        raise ValueError("predictors.kind 'method' runs the variants dense, sparse_method and "
                         f"dense_kernel; other predictors the others, got {config['variants']}")
    prefill = config.get("prefill")
    if prefill is not None and (not is_method or prefill not in ("dense", "per_token")):
        raise ValueError("prefill ('dense' or 'per_token') is a choice of predictors.kind 'method'; "
                         f"got {prefill!r} with predictors.kind {pred['kind']!r}")
    weights = config["weights"]
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"weights must be one of {WEIGHT_FORMATS}, got {weights!r}")
    if weights != "model" and (is_method or model.get("dtype", "float32") != "float32"):
        raise ValueError(f"weights {weights!r} quantizes a float32 model's MLPs for the "
                         "predictor variants: not with predictors.kind 'method' or a model dtype "
                         f"{model.get('dtype')!r}")
    if weights != "model" and "dense_kernel" in config["variants"]:
        raise ValueError("variant 'dense_kernel' (the float MLP through the by-index kernel) needs "
                         f"weights 'model': with {weights!r} weights 'dense' already runs the kernel")
    if weights == "model" and "dense_float" in config["variants"]:
        raise ValueError("variant 'dense_float' (the float model beside an int8 dense baseline) "
                         f"needs int8 weights, one of {WEIGHT_FORMATS[1:]}")


# --------------------------------------------------------------------------------------
# model, predictors, prompt
# --------------------------------------------------------------------------------------


def full_model_bytes(config: dict[str, Any], dtype: torch.dtype) -> DecodeBytes | None:
    """Bytes per token of the full-depth model a random config stands in for, if given."""
    spec = config["model"]
    full = spec.get("llama_config", {}).get("full_num_hidden_layers")
    if spec["kind"] != "random_llama" or not full:
        return None
    from transformers import LlamaConfig

    fields = {k: v for k, v in spec["llama_config"].items() if k != "full_num_hidden_layers"}
    return decode_bytes_from_config(LlamaConfig(**fields), dtype, num_hidden_layers=int(full))


def predictor_cache_key(model, spec: dict[str, Any]) -> str:
    """Hash of everything trained predictors depend on (model identity, recipe, corpus)."""
    ident = model_identity(model)
    payload = {"model": ident, "predictors": spec, "corpus": "pydoc", "held_out": 0.25,
               "recipe": PREDICTOR_CACHE_VERSION}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def trained_predictors(model, tokenizer, spec: dict[str, Any], progress: bool = True,
                       log: Callable[[str], None] = print):
    """Predictors for ``model`` from the cache, trained (and cached) on first use.

    Training: record ``train_texts`` passages of the corpus' training split (the held-out
    part is what notebook 10 evaluates quality on), truncated to ``max_length`` tokens,
    then ``sl.train_predictors`` with the spec's rule, rank, loss, epochs and seed.
    Returns ``(predictors, info)``.
    """

    path = cache_dir() / "predictors" / predictor_cache_key(model, spec)
    info: dict[str, Any] = {"cache_path": str(path), "trained_now": False}
    if (path / "predictors.json").is_file():
        try:
            predictors = Predictors.load(path, model=model)
            log(f"predictors loaded from {path}")
            return predictors, info
        except PredictorFileError as err:  # corrupted cache: train again
            log(f"cached predictors unusable ({err}); training again")
    t0 = time.perf_counter()
    rule = rule_from_dict(spec.get("rule", {"name": "Calibrated", "density": 0.5}))
    train_texts, _ = split(load_corpus(), held_out=0.25)
    texts = train_texts[: int(spec.get("train_texts", 64))]
    store = tuple(dict.fromkeys(("mlp_in", "h", rule.source)))
    log(f"training predictors on {len(texts)} passages (first use; cached at {path})")
    trace = record(model, tokenizer, texts, max_length=int(spec.get("max_length", 128)),
                      store=store, progress=progress)
    predictors = train_predictors(
        trace, rule=rule, rank=spec["rank"], epochs=int(spec.get("epochs", 8)),
        seed=int(spec.get("seed", 0)), loss=spec.get("loss", "mass"), progress=progress)
    del trace
    gc.collect()
    predictors.save(path)
    info.update(trained_now=True, train_seconds=time.perf_counter() - t0)
    return Predictors.load(path, model=model), info


def make_prompt(config: dict[str, Any], tokenizer, vocab_size: int) -> torch.Tensor:
    """The fixed prompt ``[1, tokens]``: a held-out corpus passage, or seeded random ids."""
    prompt = config["prompt"]
    n = int(prompt["tokens"])
    if prompt["kind"] == "random":
        g = torch.Generator().manual_seed(int(prompt.get("seed", 0)))
        return torch.randint(0, vocab_size, (1, n), generator=g)
    _, held_out = split(load_corpus(), held_out=0.25)
    ids = tokenizer(held_out[int(prompt.get("index", 0))], return_tensors="pt").input_ids[:, :n]
    if ids.shape[1] < n:
        raise ValueError(f"held-out passage {prompt.get('index', 0)} has only {ids.shape[1]} tokens; "
                         f"prompt.tokens is {n}")
    return ids


def fitted_method(model, tokenizer, spec: dict[str, Any], density: float, progress: bool = True,
                  log: Callable[[str], None] = print):
    """A selection method from ``spec["method"]`` (``{"name": "shadow", "calibrated": ...,
    "x_bits": 8, ...}``) at ``density``, fitted on a recording of the first ``train_texts``
    passages of the corpus' training split (``max_length`` tokens each; what
    ``experiments/run_frontier.py`` fits on). Returns ``(method, info)``."""
    from sparselab.prediction import methods as M

    params = {k: v for k, v in spec["method"].items() if k != "name"}
    method = M.Shadow(density, **params)
    t0 = time.perf_counter()
    trace = None
    if method.calibrated:
        train_texts, _ = split(load_corpus(), held_out=0.25)
        texts = train_texts[: int(spec.get("train_texts", 32))]
        log(f"recording {len(texts)} training passages to fit {method!r}")
        trace = record(model, tokenizer, texts, max_length=int(spec.get("max_length", 256)),
                       store=("mlp_in",), progress=progress)
    method = method.fit(model, trace)
    del trace
    gc.collect()
    info = {"kind": "method", **method.describe(), "bytes": method.bytes,
            "fit_seconds": time.perf_counter() - t0, "fast_decode": method.fast_decode,
            "train_texts": spec.get("train_texts", 32), "max_length": spec.get("max_length", 256)}
    return method, info


@dataclass
class Setup:
    """Everything a benchmark run measures with (see :func:`prepare`)."""

    config: dict[str, Any]
    model: Any
    tokenizer: Any
    predictors: Any  # at the config's density, ready for sl.sparsify
    input_ids: torch.Tensor
    budget: DecodeBytes
    full_budget: DecodeBytes | None
    rss_before_model: int
    rss_model: int
    predictor_info: dict[str, Any] = field(default_factory=dict)
    huge_page_bytes: int = 0  # of the model's weights, collapsed to 2 MiB pages


def prepare(config: dict[str, Any], threads: int | None = None, progress: bool = True,
            log: Callable[[str], None] = print) -> Setup:
    """Build the model, its predictors and the prompt of ``config`` (threads set first)."""
    check_config(config)
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(int(threads))
    gc.collect()
    before = rss_bytes()
    spec = config["model"]
    if spec["kind"] == "embedded":
        model, tokenizer = load_model()
    else:
        model, tokenizer = build_random_llama(spec), None
    model.eval()
    input_ids = make_prompt(config, tokenizer, model.config.vocab_size)
    with torch.no_grad():  # fault in lazily mapped weight pages: RSS then shows the model
        model(input_ids=input_ids[:, :1], use_cache=False)
    # every variant on 2 MiB pages from the start: else the first sparsify (IndexedMLP) would
    # collapse the MLP weights mid-run, and the dense baseline would have run on 4 KiB pages
    huge_bytes = use_huge_pages(*model.parameters())
    release_memory()
    rss_model = rss_bytes() - before
    dtype = next(model.parameters()).dtype
    adapter = adapter_for(model)
    pspec = config["predictors"]
    density = float(config["density"])
    if pspec["kind"] == "method":
        predictors, pinfo = fitted_method(model, tokenizer, pspec, density, progress, log)
    elif pspec["kind"] == "trained":
        predictors, pinfo = trained_predictors(model, tokenizer, pspec, progress, log)
        predictors = predictors.with_policy(target_density=density)
        pinfo.update(kind="trained", rank=predictors.ranks[predictors.layers[0]],
                     rule=predictors.rule.describe(), policy=predictors.policy.describe(),
                     bytes=predictors.bytes, layers=len(predictors.layers))
    else:
        predictors = RandomLowRankPredictors(
            hidden=model.config.hidden_size, n_neurons=adapter.n_neurons,
            layers=range(adapter.n_layers), rank=pspec["rank"], density=density,
            seed=int(pspec.get("seed", 0)), dtype=dtype)
        pinfo = predictors.describe()
    release_memory()
    budget, full_budget = decode_bytes(model), full_model_bytes(config, dtype)
    if config["weights"] != "model":  # every variant's byte bound is against the int8 dense step
        budget, full_budget = (
            None if b is None else
            with_int8_mlp(b, model.config.hidden_size, **INT8_FORMATS[config["weights"]])
            for b in (budget, full_budget))
    return Setup(config=config, model=model, tokenizer=tokenizer, predictors=predictors,
                 input_ids=input_ids, budget=budget,
                 full_budget=full_budget, rss_before_model=before,
                 rss_model=rss_model, predictor_info=pinfo, huge_page_bytes=huge_bytes)


# --------------------------------------------------------------------------------------
# measuring
# --------------------------------------------------------------------------------------


def variant_factories(setup: Setup) -> dict[str, Callable | None]:
    """Name -> None (the model as it is) or a factory that sparsifies it (undone by ``restore``).

    With ``weights`` an int8 format (``"int8"``, ``"int8_b64"``, ``"int8_rows"``, ``"int8_rowcol"``) every
    sparse variant runs int8 MLP weights, and ``dense`` is the dense int8 MLP: all neurons
    through the same by-index kernel (``dense_float`` is then the float model as it is).
    """
    model, p, weights = setup.model, setup.predictors, setup.config["weights"]

    def sparse(use_cache: bool):
        return lambda: sparsify(model, p, mode="predicted", use_cache=use_cache, kernel="fast",
                                weights=weights)

    def dense_kernel():  # every neuron through the by-index kernel, in the config's weights
        adapter = adapter_for(model)
        every = {i: torch.arange(adapter.n_neurons) for i in range(adapter.n_layers)}
        return sparsify(model, mode="static", static_neurons=every, use_cache=False,
                        kernel="fast", weights=weights)

    all_ = {"dense": None if weights == "model" else dense_kernel, "dense_float": None,
            "dense_kernel": dense_kernel, "sparse_cache": sparse(True),
            "sparse_direct": sparse(False),
            "sparse_method": lambda: sparsify(model, method=p, kernel="fast",
                                              prefill=setup.config.get("prefill"))}
    return {name: all_[name] for name in setup.config["variants"]}


def _nested(summary: pd.DataFrame) -> dict[str, dict[str, dict[str, float]]]:
    out: dict[str, dict[str, dict[str, float]]] = {}
    for (variant, metric), row in summary.iterrows():
        out.setdefault(variant, {})[metric] = {k: float(v) for k, v in row.items()}
    return out


def analyse(setup: Setup, runs: pd.DataFrame) -> dict[str, Any]:
    """Summaries, speedups against the byte bound, targets and the time split of ``runs``."""
    config, budget = setup.config, setup.budget
    density = float(config["density"])
    pbytes = int(setup.predictors.bytes)
    bound = budget.bound(density)
    bound_p = budget.bound(density, pbytes)
    sp = speedups(runs)
    cached = [v for v in config["variants"] if v == "sparse_cache"]
    targets = check_targets(runs, budget, density, pbytes, cached=cached, resident_bytes=pbytes)
    speedup = {}
    for variant, row in sp.iterrows():
        d = {k: float(v) for k, v in row.items()}
        d["ratio_to_bound"] = d["decode_speedup"] / bound
        d["ratio_to_bound_with_predictor"] = d["decode_speedup"] / bound_p
        speedup[variant] = d
    out_ids = runs.attrs.get("outputs", {})
    agree = {}
    if "dense" in out_ids:
        n = setup.input_ids.shape[1]
        dense_new = out_ids["dense"][:, n:]
        for v, ids in out_ids.items():
            agree[v] = float((ids[:, n:] == dense_new).double().mean())
    bound_info: dict[str, Any] = {
        "density": density, "f": budget.f, "bound": bound, "bound_with_predictor": bound_p,
        "predictor_bytes": pbytes, "predictor_share": pbytes / budget.total,
    }
    if setup.full_budget is not None:
        full = setup.full_budget
        per_layer = pbytes / max(budget.n_layers, 1)
        bound_info["full_model"] = {
            "n_layers": full.n_layers, "f": full.f, "bound": full.bound(density),
            "bound_with_predictor": full.bound(density, int(per_layer * full.n_layers)),
        }
    split = split_table(runs)
    gap = shortfall(runs, budget, density, pbytes)
    return {
        "bytes": budget.describe(),
        "bytes_full_model": setup.full_budget.describe() if setup.full_budget else None,
        "bound": bound_info,
        "summary": _nested(summarize(runs)),
        "speedup": speedup,
        "split_ms": {v: {k: float(x) for k, x in row.items()} for v, row in split.iterrows()},
        "targets": targets.to_dict(orient="records"),
        "shortfall_ms": {v: {c: {k: float(x) for k, x in row.items()} for c, row in part.droplevel(0).iterrows()}
                         for v, part in gap.groupby(level=0)},
        "greedy_agreement_with_dense": agree,
        "memory": {
            "rss_before_model": setup.rss_before_model,
            "rss_model_at_rest": setup.rss_model,
            "dense_rss_at_rest": float(runs.loc[~runs.warmup & (runs.variant == "dense"), "rss_at_rest"].median()),
            "extra_bytes": {v: float(x) for v, x in runs[~runs.warmup].groupby("variant").extra_bytes.median().items()},
            "active_rows_bytes": {v: float(x) for v, x in runs[~runs.warmup].groupby("variant").active_rows_bytes.median().items()},
            "predictor_bytes_resident_in_all_runs": pbytes,
        },
    }


def measure(setup: Setup, num_runs: int | None = None, warmup_runs: int | None = None,
            max_new_tokens: int | None = None, progress: bool = True,
            log: Callable[[str], None] | None = None) -> tuple[dict[str, Any], pd.DataFrame]:
    """Run the alternating comparison; returns (JSON-able result, runs frame)."""
    config = copy.deepcopy(setup.config)
    for key, value in (("num_runs", num_runs), ("warmup_runs", warmup_runs),
                       ("max_new_tokens", max_new_tokens)):
        if value is not None:
            config[key] = value
    check_config(config)
    started = time.time()
    machine = machine_info()
    runs = compare(
        setup.model, setup.input_ids, variant_factories(setup), num_runs=config["num_runs"],
        warmup_runs=config["warmup_runs"], max_new_tokens=config["max_new_tokens"],
        memory_interval=float(config["memory_interval_s"]), progress=progress, log=log)
    result = {
        "name": config["name"],
        "config": config,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "wall_time_s": time.time() - started,
        "versions": versions(),
        "torch_threads": torch.get_num_threads(),
        "machine": machine,
        "huge_page_bytes": setup.huge_page_bytes,
        "loadavg_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "model": model_identity(setup.model),
        "predictors": setup.predictor_info,
        "prompt": {"n_tokens": int(setup.input_ids.shape[1]), **config["prompt"]},
        **analyse(setup, runs),
    }
    return result, runs
