"""What sparsity costs in quality: perplexity, KL to dense and greedy agreement, per mode.

    >>> train, test = sl.corpus.split(sl.load_corpus())
    >>> trace = sl.record(model, tokenizer, train[:64], max_length=256)
    >>> predictors = sl.train_predictors(trace, rank=64)
    >>> df = sl.evaluate(model, tokenizer, test[:8], predictors=predictors, static_trace=trace)
    >>> df.pivot(index="density", columns="mode", values="perplexity")

Pass *held-out* texts: the predictors, the static neuron sets and any fitted rule are
fitted on a training part of the corpus (``static_trace``), and ``texts`` must not overlap
it, or the numbers flatter every learned mode.

- perplexity and KL come from teacher-forced full-sequence forward passes, one text at a
  time, each truncated to ``max_length`` tokens. Every token gets its own mask in every
  layer (``prefill="per_token"``): oracle = the rule's true mask, predicted = the
  predictor's mask for that token, static = the fixed set. KL is the mean over predicted
  positions of KL(dense || sparse) of the next-token distributions.
- greedy agreement: the first ``prompt_length`` tokens of ``n_prompts`` texts are the
  prompts; dense and sparse each generate exactly ``n_generate`` greedy tokens (no early
  stop) with the KV cache; prefill is dense and decode steps sparse with per-row masks
  (what one user's generation would see); agreement is the share of positions whose token
  equals dense's.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pandas as pd
import torch

from sparselab._checks import check_fractions
from sparselab.masking.rules import Rule, TopK
from sparselab.models import model_identity
from sparselab.prediction.static import static_from_trace
from sparselab.runtime.sparsify import sparsify

__all__ = ["COLUMNS", "EVALUATION_MODES", "evaluate"]

EVALUATION_MODES = ("dense", "oracle", "static", "predicted")
COLUMNS = ("mode", "density", "perplexity", "kl", "greedy_agreement", "n_tokens", "n_generated")


def _check_args(texts, densities, modes, max_length, n_generate, n_prompts) -> None:
    if isinstance(texts, str) or not texts or not all(isinstance(t, str) for t in texts):
        raise ValueError("texts must be a non-empty list of strings (held-out passages)")
    unknown = [m for m in modes if m not in EVALUATION_MODES]
    if unknown:
        raise ValueError(f"unknown modes {unknown}; expected any of {EVALUATION_MODES}")
    check_fractions("densities", densities)
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2 (one prediction needs two tokens), got {max_length}")
    if n_generate < 0 or n_prompts < 0:
        raise ValueError("n_generate and n_prompts must be >= 0")


def _rule_at(rule_factory: Callable[[float], Rule], density: float, fit_trace) -> Rule:
    rule = rule_factory(density)
    if not rule.fitted:
        if fit_trace is None:
            raise ValueError(f"rule {rule.label} needs fitting: pass static_trace= (a trace of "
                             "training text) to fit it on")
        rule = rule.fit(fit_trace)
    return rule


def _extra_configs(extra_modes, densities) -> list[tuple[str, float, dict[str, Any]]]:
    """Configs of the named extra modes: ``make(density)`` gives the sparsify kwargs."""
    configs = []
    for name, make in (extra_modes or {}).items():
        if not isinstance(name, str) or name in EVALUATION_MODES:
            raise ValueError(f"extra mode names must be strings other than {EVALUATION_MODES}, got {name!r}")
        if not callable(make):
            raise TypeError(f"extra mode {name!r} must map a density to sparsify kwargs, "
                            f"got {type(make).__name__}")
        for d in densities:
            kwargs = dict(make(float(d)))
            if kwargs.get("mode") not in ("oracle", "static", "predicted", "method"):
                raise ValueError(f"extra mode {name!r}: its kwargs need mode='oracle', 'static', "
                                 f"'predicted' or 'method', got {kwargs.get('mode')!r}")
            fixed = sorted({"prefill", "kernel", "record_stats", "use_cache", "union"} & set(kwargs))
            if fixed:
                raise ValueError(f"extra mode {name!r}: {fixed} are set by sl.evaluate itself")
            configs.append((name, float(d), kwargs))
    return configs


def _plan(modes, densities, predictors, static_trace, rule_factory,
          extra_modes=None) -> tuple[list, list]:
    """(configs [(mode, density, sparsify kwargs)], skipped modes with reasons)."""
    configs: list[tuple[str, float, dict[str, Any]]] = []
    skipped = []
    if "dense" in modes:
        configs.append(("dense", 1.0, {}))
    for mode in modes:
        if mode == "predicted" and predictors is None:
            skipped.append(("predicted", "no predictors given"))
            continue
        if mode == "static" and static_trace is None:
            skipped.append(("static", "no static_trace given (the static sets are chosen on training text)"))
            continue
        for d in densities:
            d = float(d)
            if mode == "oracle":
                configs.append((mode, d, {"mode": "oracle", "rule": _rule_at(rule_factory, d, static_trace)}))
            elif mode == "static":
                rule = _rule_at(rule_factory, d, static_trace)
                sets = static_from_trace(static_trace, rule, d)
                configs.append((mode, d, {"mode": "static", "static_neurons": sets}))
            elif mode == "predicted":
                configs.append((mode, d, {"mode": "predicted", "predictors": predictors.at_density(d)}))
    configs += _extra_configs(extra_modes, densities)
    for mode, reason in skipped:
        warnings.warn(f"sl.evaluate: mode {mode!r} skipped: {reason}", stacklevel=3)
    return configs, skipped


def _encode(tokenizer, texts: Sequence[str], max_length: int) -> list[torch.Tensor]:
    out = []
    for text in texts:
        ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_length).input_ids
        if ids.shape[1] >= 2:
            out.append(ids)
    if not out:
        raise ValueError("no text has two or more tokens")
    return out


def _log_probs(model, ids: torch.Tensor) -> torch.Tensor:
    """Next-token log-probabilities [T-1, V] (float32) of a teacher-forced forward."""
    logits = model(input_ids=ids, use_cache=False).logits[0, :-1]
    return torch.log_softmax(logits.float(), dim=-1)


def _generate(model, batch: dict, n: int, pad_id: int) -> torch.Tensor:
    out = model.generate(**batch, do_sample=False, max_new_tokens=n, min_new_tokens=n,
                         pad_token_id=pad_id, use_cache=True, top_p=None, top_k=None,
                         temperature=None)
    return out[:, batch["input_ids"].shape[1]:]


def evaluate(
    model,
    tokenizer,
    texts: Sequence[str],
    predictors=None,
    densities: Sequence[float] = (0.1, 0.3, 0.5, 0.7, 0.9),
    modes: Sequence[str] = EVALUATION_MODES,
    rule_factory: Callable[[float], Rule] = TopK,
    max_length: int = 256,
    n_generate: int = 32,
    n_prompts: int = 8,
    static_trace=None,
    prompt_length: int = 32,
    kernel: str = "fast",
    progress: bool = True,
    extra_modes: Mapping[str, Callable[[float], dict[str, Any]]] | None = None,
    methods: Sequence | None = None,
) -> pd.DataFrame:
    """Quality of ``model`` run sparsely, per mode and density, as one tidy DataFrame.

        >>> df = sl.evaluate(model, tokenizer, test_texts[:4], densities=(0.3, 0.5))
        >>> df[["mode", "density", "perplexity", "kl", "greedy_agreement"]]

    ``texts`` must be held out from whatever fitted the predictors / static sets (see the
    module docstring). ``rule_factory(d)`` gives the oracle rule at density ``d`` (and the
    rule whose most frequent neurons form the static set); rules that need fitting are
    fitted on ``static_trace``. Modes that lack their input (``predictors`` for
    "predicted", ``static_trace`` for "static") are skipped with a warning. Columns:
    mode, density, perplexity, kl, greedy_agreement, n_tokens, n_generated;
    ``extra_modes`` adds named configurations scored on the same tokens against the same
    dense pass: ``{name: make}`` where ``make(density)`` returns ``sl.sparsify`` keyword
    arguments (e.g. ``{"random": lambda d: {"mode": "static", "static_neurons": sets(d)}}``
    or another oracle rule, or ``{"mode": "method", "method": sl.prediction.methods.TEAL(0.7, d)
    .fit(model, trace)}`` for any selection method); their rows carry ``mode=name``.
    ``methods``: fitted selection methods (:mod:`sparselab.prediction.methods`), each
    scored at its own operating point: rows ``mode="<name> <point>"``, density NaN.
    :func:`sparselab.frontier` scores them with each method's bytes read.
    ``df.attrs`` holds the config, model identity and versions.
    """
    from tqdm.auto import tqdm

    from sparselab._version import versions

    modes = tuple(modes)
    _check_args(texts, densities, modes, max_length, n_generate, n_prompts)
    configs, skipped = _plan(modes, densities, predictors, static_trace, rule_factory, extra_modes)
    for m in methods or ():
        configs.append((f"{m.name} {m.point}", float("nan"), {"mode": "method", "method": m}))
    sparse_configs = [c for c in configs if c[0] != "dense"]
    encoded = _encode(tokenizer, texts, max_length)

    nll = {i: 0.0 for i in range(len(configs))}
    kl = {i: 0.0 for i in range(len(configs))}
    n_tokens = 0
    bar = tqdm(total=len(encoded) * (1 + len(sparse_configs)), desc="perplexity/KL",
               unit="pass", disable=not progress)
    with torch.no_grad():
        for ids in encoded:
            targets = ids[0, 1:]
            dense_lp = _log_probs(model, ids)
            bar.update()
            dense_p = dense_lp.exp()
            dense_nll = -float(dense_lp.gather(1, targets[:, None]).sum())
            n_tokens += len(targets)
            for i, (mode, _d, kwargs) in enumerate(configs):
                if mode == "dense":
                    nll[i] += dense_nll
                    continue
                with sparsify(model, prefill="per_token", kernel=kernel, record_stats=False, **kwargs):
                    lp = _log_probs(model, ids)
                bar.update()
                nll[i] += -float(lp.gather(1, targets[:, None]).sum())
                # KL(dense || sparse) per position, summed; 0 * log 0 terms are 0
                kl[i] += float((dense_p * (dense_lp - lp)).sum())
    bar.close()

    agreement = {i: float("nan") for i in range(len(configs))}
    n_generated = 0
    prompts = [t for t in texts][:n_prompts]
    if n_generate and prompts:
        agreement, n_generated = _agreement(model, tokenizer, prompts, configs, n_generate,
                                            prompt_length, kernel, progress)

    rows = []
    for i, (mode, density, _kwargs) in enumerate(configs):
        rows.append({
            "mode": mode, "density": density, "perplexity": math.exp(nll[i] / n_tokens),
            "kl": kl[i] / n_tokens, "greedy_agreement": agreement[i], "n_tokens": n_tokens,
            "n_generated": n_generated,
        })
    df = pd.DataFrame(rows, columns=list(COLUMNS))
    df.attrs["config"] = {
        "densities": [float(d) for d in densities], "modes": list(modes),
        "rule": rule_factory(0.5).describe() if isinstance(rule_factory(0.5), Rule) else str(rule_factory),
        "max_length": max_length, "n_generate": n_generate, "n_prompts": len(prompts),
        "prompt_length": prompt_length, "n_texts": len(encoded), "kernel": kernel,
        "teacher_forced_prefill": "per_token", "generation": "dense prefill, per-row sparse decode",
        "skipped": dict(skipped),
        "extra_modes": list(extra_modes or {}),
        "methods": [m.describe() for m in methods or ()],
        "predictors": _describe_predictors(predictors),
    }
    df.attrs["model"] = model_identity(model)
    df.attrs["versions"] = versions()
    return df


def _describe_predictors(predictors) -> dict | None:
    if predictors is None:
        return None
    if callable(getattr(predictors, "describe", None)):
        return predictors.describe()
    return {"class": type(predictors).__name__, "layers": [int(i) for i in predictors.layers],
            "lookahead": bool(predictors.lookahead), "bytes": int(getattr(predictors, "bytes", 0))}


def _agreement(model, tokenizer, prompts, configs, n_generate, prompt_length, kernel, progress):
    """Share of the first ``n_generate`` greedy tokens equal to dense's, per config."""
    from tqdm.auto import tqdm

    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues from the last column
    try:
        batch = tokenizer(list(prompts), return_tensors="pt", padding=True, truncation=True,
                          max_length=prompt_length)
    finally:
        tokenizer.padding_side = side
    batch = dict(batch.to(next(model.parameters()).device))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = {}
    with torch.no_grad():
        dense = _generate(model, batch, n_generate, pad_id)
        for i, (mode, _d, kwargs) in enumerate(tqdm(configs, desc="greedy agreement",
                                                    unit="config", disable=not progress)):
            if mode == "dense":
                out[i] = 1.0
                continue
            with sparsify(model, prefill="dense", union=False, use_cache=False, kernel=kernel,
                          record_stats=False, **kwargs):
                tokens = _generate(model, batch, n_generate, pad_id)
            out[i] = float((tokens == dense).double().mean())
    return out, int(dense.numel())
