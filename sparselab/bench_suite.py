"""Benchmark suites from JSON configs: prepare a model and predictors, run dense and sparse
variants alternately, analyse against the byte bound, write JSON / CSV / Markdown.

    >>> from sparselab import bench_suite
    >>> config = bench_suite.load_config("experiments/configs/smollm2_135m.json")
    >>> setup = bench_suite.prepare(config, threads=1)
    >>> result, runs = bench_suite.measure(setup, num_runs=5)
    >>> print(bench_suite.report(result, runs))

``experiments/run_benchmark.py`` is the command line around this module; notebook 10 uses
it directly. A config names the model, the predictors, the MLP density, the prompt and the
run sizes (see ``experiments/configs/*.json``):

- ``model.kind = "embedded"``: the embedded SmolLM2-135M (``sl.load_model()``) with
  predictors trained on a recording of the corpus' training split on first use and cached
  under ``sparselab.models.cache_dir()/predictors/<hash of what they depend on>``;
- ``model.kind = "random_llama"``: a ``LlamaForCausalLM`` of the given shapes with random
  weights (nothing downloaded; decode speed does not depend on the values) and
  :class:`sparselab.bench.RandomLowRankPredictors` keeping a fixed share of neurons.

Variants ``dense``, ``sparse_cache`` (predictor -> mask -> ``WeightCache`` -> kernel) and
``sparse_direct`` (index-list kernel over the full weights, no cache) run alternately in
one process (:func:`sparselab.bench.compare`).
"""

from __future__ import annotations

import copy
import gc
import hashlib
import json
import math
import os
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

import sparselab as sl
from sparselab import bench

VARIANTS = ("dense", "sparse_cache", "sparse_direct")
PREDICTOR_CACHE_VERSION = 1  # bump when the training recipe below changes

DEFAULTS: dict[str, Any] = {
    "density": 0.5,
    "max_new_tokens": 32,
    "warmup_runs": 2,
    "num_runs": 10,
    "threads": None,
    "variants": list(VARIANTS),
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
    if pred.get("kind") not in ("trained", "random_low_rank"):
        raise ValueError(f"predictors.kind must be 'trained' or 'random_low_rank', got {pred.get('kind')!r}")
    if pred["kind"] == "trained" and kind != "embedded":
        raise ValueError("trained predictors need a real model and text: use model.kind 'embedded'")
    if "rank" not in pred:
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


# --------------------------------------------------------------------------------------
# model, predictors, prompt
# --------------------------------------------------------------------------------------


def build_random_llama(spec: dict[str, Any]):
    """``LlamaForCausalLM`` with the config's shapes and random weights (tiled, seeded).

    HF's initialisation draws ~1 G normal numbers for a 3B-shaped model (tens of seconds);
    skipping it and tiling one random block is a copy, and speed does not depend on the
    values. Norm weights stay 1, the LM head is tied when the config says so.
    """
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.initialization import no_init_weights

    fields = {k: v for k, v in spec["llama_config"].items() if k != "full_num_hidden_layers"}
    fields["num_hidden_layers"] = int(spec.get("num_hidden_layers", fields.get("num_hidden_layers", 2)))
    dtype = getattr(torch, spec.get("dtype", "float32"))
    cfg = LlamaConfig(**fields)
    with no_init_weights():
        model = LlamaForCausalLM(cfg)
    if cfg.tie_word_embeddings:
        model.tie_weights()
    model = model.to(dtype).eval()
    g = torch.Generator().manual_seed(int(spec.get("seed", 0)))
    scale = float(spec.get("init_scale", 0.02)) * math.sqrt(3.0)  # uniform with that std
    with torch.no_grad():
        for p in {id(p): p for p in model.parameters()}.values():
            if p.dim() == 2:
                bench._fill_(p, scale, g)
    model.config.sparselab_name = f"random-llama-{fields['num_hidden_layers']}L"
    model.generation_config.pad_token_id = 0
    return model


def full_model_bytes(config: dict[str, Any], dtype: torch.dtype) -> bench.DecodeBytes | None:
    """Bytes per token of the full-depth model a random config stands in for, if given."""
    spec = config["model"]
    full = spec.get("llama_config", {}).get("full_num_hidden_layers")
    if spec["kind"] != "random_llama" or not full:
        return None
    from transformers import LlamaConfig

    fields = {k: v for k, v in spec["llama_config"].items() if k != "full_num_hidden_layers"}
    return bench.decode_bytes_from_config(LlamaConfig(**fields), dtype, num_hidden_layers=int(full))


def predictor_cache_key(model, spec: dict[str, Any]) -> str:
    """Hash of everything trained predictors depend on (model identity, recipe, corpus)."""
    ident = sl.models.model_identity(model)
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
    from sparselab.predictors import PredictorFileError, Predictors, train_predictors

    path = sl.models.cache_dir() / "predictors" / predictor_cache_key(model, spec)
    info: dict[str, Any] = {"cache_path": str(path), "trained_now": False}
    if (path / "predictors.json").is_file():
        try:
            predictors = Predictors.load(path, model=model)
            log(f"predictors loaded from {path}")
            return predictors, info
        except PredictorFileError as err:  # corrupted cache: train again
            log(f"cached predictors unusable ({err}); training again")
    t0 = time.perf_counter()
    rule = sl.rules.rule_from_dict(spec.get("rule", {"name": "Calibrated", "density": 0.5}))
    train_texts, _ = sl.corpus.split(sl.load_corpus(), held_out=0.25)
    texts = train_texts[: int(spec.get("train_texts", 64))]
    store = tuple(dict.fromkeys(("mlp_in", "h", rule.source)))
    log(f"training predictors on {len(texts)} passages (first use; cached at {path})")
    trace = sl.record(model, tokenizer, texts, max_length=int(spec.get("max_length", 128)),
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
    _, held_out = sl.corpus.split(sl.load_corpus(), held_out=0.25)
    ids = tokenizer(held_out[int(prompt.get("index", 0))], return_tensors="pt").input_ids[:, :n]
    if ids.shape[1] < n:
        raise ValueError(f"held-out passage {prompt.get('index', 0)} has only {ids.shape[1]} tokens; "
                         f"prompt.tokens is {n}")
    return ids


@dataclass
class Setup:
    """Everything a benchmark run measures with (see :func:`prepare`)."""

    config: dict[str, Any]
    model: Any
    tokenizer: Any
    predictors: Any  # at the config's density, ready for sl.sparsify
    input_ids: torch.Tensor
    budget: bench.DecodeBytes
    full_budget: bench.DecodeBytes | None
    rss_before_model: int
    rss_model: int
    predictor_info: dict[str, Any] = field(default_factory=dict)


def prepare(config: dict[str, Any], threads: int | None = None, progress: bool = True,
            log: Callable[[str], None] = print) -> Setup:
    """Build the model, its predictors and the prompt of ``config`` (threads set first)."""
    check_config(config)
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(int(threads))
    gc.collect()
    before = bench.rss_bytes()
    spec = config["model"]
    if spec["kind"] == "embedded":
        model, tokenizer = sl.load_model()
    else:
        model, tokenizer = build_random_llama(spec), None
    model.eval()
    input_ids = make_prompt(config, tokenizer, model.config.vocab_size)
    with torch.no_grad():  # fault in lazily mapped weight pages: RSS then shows the model
        model(input_ids=input_ids[:, :1], use_cache=False)
    bench.release_memory()
    rss_model = bench.rss_bytes() - before
    dtype = next(model.parameters()).dtype
    adapter = sl.models.adapter_for(model)
    pspec = config["predictors"]
    density = float(config["density"])
    if pspec["kind"] == "trained":
        predictors, pinfo = trained_predictors(model, tokenizer, pspec, progress, log)
        predictors = predictors.with_policy(target_density=density)
        pinfo.update(kind="trained", rank=predictors.ranks[predictors.layers[0]],
                     rule=predictors.rule.describe(), policy=predictors.policy.describe(),
                     bytes=predictors.bytes, layers=len(predictors.layers))
    else:
        predictors = bench.RandomLowRankPredictors(
            hidden=model.config.hidden_size, n_neurons=adapter.n_neurons,
            layers=range(adapter.n_layers), rank=pspec["rank"], density=density,
            seed=int(pspec.get("seed", 0)), dtype=dtype)
        pinfo = predictors.describe()
    bench.release_memory()
    return Setup(config=config, model=model, tokenizer=tokenizer, predictors=predictors,
                 input_ids=input_ids, budget=bench.decode_bytes(model),
                 full_budget=full_model_bytes(config, dtype), rss_before_model=before,
                 rss_model=rss_model, predictor_info=pinfo)


# --------------------------------------------------------------------------------------
# measuring
# --------------------------------------------------------------------------------------


def variant_factories(setup: Setup) -> dict[str, Callable | None]:
    """Name -> None (dense) or a factory that sparsifies the model (undone by ``restore``)."""
    model, p = setup.model, setup.predictors

    def sparse(use_cache: bool):
        return lambda: sl.sparsify(model, p, mode="predicted", use_cache=use_cache, kernel="fast")

    all_ = {"dense": None, "sparse_cache": sparse(True), "sparse_direct": sparse(False)}
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
    sp = bench.speedups(runs)
    cached = [v for v in config["variants"] if v == "sparse_cache"]
    targets = bench.check_targets(runs, budget, density, pbytes, cached=cached, resident_bytes=pbytes)
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
    split = bench.split_table(runs)
    gap = bench.shortfall(runs, budget, density, pbytes)
    return {
        "bytes": budget.describe(),
        "bytes_full_model": setup.full_budget.describe() if setup.full_budget else None,
        "bound": bound_info,
        "summary": _nested(bench.summarize(runs)),
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


def machine_info() -> dict[str, Any]:
    import psutil

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    return {
        "platform": platform.platform(), "machine": platform.machine(), "cpu": cpu,
        "cpu_count_logical": os.cpu_count(), "cpu_count_physical": psutil.cpu_count(logical=False),
        "cpu_affinity": affinity, "memory_total": psutil.virtual_memory().total,
        "memory_available": psutil.virtual_memory().available,
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "fast": _fast_info(),
    }


def _fast_info() -> dict[str, Any]:
    from sparselab import _fast

    return _fast.info()


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
    runs = bench.compare(
        setup.model, setup.input_ids, variant_factories(setup), num_runs=config["num_runs"],
        warmup_runs=config["warmup_runs"], max_new_tokens=config["max_new_tokens"],
        memory_interval=float(config["memory_interval_s"]), progress=progress, log=log)
    result = {
        "name": config["name"],
        "config": config,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "wall_time_s": time.time() - started,
        "versions": sl.versions(),
        "torch_threads": torch.get_num_threads(),
        "machine": machine,
        "loadavg_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "model": sl.models.model_identity(setup.model),
        "predictors": setup.predictor_info,
        "prompt": {"n_tokens": int(setup.input_ids.shape[1]), **config["prompt"]},
        **analyse(setup, runs),
    }
    return result, runs


# --------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------


def _json_safe(x):
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return None if not math.isfinite(float(x)) else float(x)
    if isinstance(x, np.bool_):
        return bool(x)
    if isinstance(x, Path):
        return str(x)
    return x


def _md_table(df: pd.DataFrame, index: bool = True, digits: int = 3) -> str:
    if index:
        df = df.reset_index()
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.{digits}f}" if math.isfinite(v) else ""
        return str(v)
    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def report(result: dict[str, Any], runs: pd.DataFrame) -> str:
    """Markdown summary of one benchmark result (what the latest ``.md`` holds)."""
    b, bound, mem = result["bytes"], result["bound"], result["memory"]
    density = bound["density"]
    budget = bench.DecodeBytes(b["mlp"], b["other"], b["lm_head"], b["embedding_row"], b["n_layers"])
    head = bench.headline(runs, budget, density, bound["predictor_bytes"])
    lines = [
        f"# Benchmark `{result['name']}`", "",
        f"- started: {result['started_at']}, wall time {result['wall_time_s']:.0f} s",
        f"- model: {result['model'].get('name')} ({result['model']['num_hidden_layers']} layers, "
        f"{result['model']['dtype']}), MLP density {density:.0%}, predictors: "
        f"{result['predictors'].get('kind')} rank {result['predictors'].get('rank')} "
        f"({bound['predictor_bytes'] / bench.MB:.1f} MiB)",
        f"- prompt {result['prompt']['n_tokens']} tokens, {result['config']['max_new_tokens']} new "
        f"tokens (greedy, KV cache, no EOS stop), {result['config']['num_runs']} runs + "
        f"{result['config']['warmup_runs']} warm-up per variant, alternating",
        f"- torch threads {result['torch_threads']}, machine {result['machine']['cpu']} "
        f"({result['machine']['cpu_count_logical']} logical CPUs), load average at start "
        f"{result['machine']['loadavg']}, torch {result['versions'].get('torch')}",
        f"- bytes read per decoded token: {b['total'] / bench.MB:.1f} MiB, MLP share f = {b['f']:.3f}; "
        f"byte bound at d = {density:g}: {bound['bound']:.3f}x, with the predictors' bytes "
        f"{bound['bound_with_predictor']:.3f}x",
    ]
    if "full_model" in bound:
        fm = bound["full_model"]
        lines.append(f"- the full {fm['n_layers']}-layer model would have f = {fm['f']:.3f}, bound "
                     f"{fm['bound']:.3f}x ({fm['bound_with_predictor']:.3f}x with predictors)")
    lines += [f"- RSS of the model at rest: {mem['rss_model_at_rest'] / bench.MB:.1f} MiB; "
              f"process at rest (dense): {mem['dense_rss_at_rest'] / bench.MB:.1f} MiB", "",
              "## Headline (median [q1-q3])", "", _md_table(head), "",
              "## Decode step split (ms per token, medians of per-run means)", "",
              _md_table(bench.split_table(runs).T), "", "## Targets", "",
              _md_table(pd.DataFrame(result["targets"]), index=False), "",
              "## Where the gap to the bound goes (ms per token)", "",
              "Ideal: the dense step with the MLP time scaled to the bytes the sparse side reads "
              "(kernel d x dense MLP, predictor its byte share of the MLP, no mask / cache / "
              "wrapper cost, the rest as dense). Excess = actual - ideal; the excesses add up "
              "to the step's distance from the ideal.", "",
              _md_table(bench.shortfall(runs, budget, density, bound["predictor_bytes"])
                        .reset_index().round(3), index=False), ""]
    agree = result.get("greedy_agreement_with_dense") or {}
    if agree:
        lines += ["Greedy tokens equal to dense's (last run): "
                  + ", ".join(f"{k} {v:.0%}" for k, v in agree.items()), ""]
    return "\n".join(lines)


def write_results(result: dict[str, Any], runs: pd.DataFrame, out_dir: str | os.PathLike) -> dict[str, Path]:
    """``<name>_<timestamp>.json/.csv`` plus the latest copies ``<name>.json/.md``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = result["name"]
    paths = {"json": out / f"{name}_{stamp}.json", "csv": out / f"{name}_{stamp}.csv",
             "latest_json": out / f"{name}.json", "latest_md": out / f"{name}.md"}
    result = {**result, "runs_csv": paths["csv"].name}
    runs.to_csv(paths["csv"], index=False)
    paths["json"].write_text(json.dumps(_json_safe(result), indent=1) + "\n")
    shutil.copyfile(paths["json"], paths["latest_json"])
    paths["latest_md"].write_text(report(result, runs))
    return paths
