"""Sweeps on Dask: a grid of (model, rule, density, rank, layers) cells, each a task.

    >>> grid = {"rule": ["Calibrated", "TopK"], "density": [0.3, 0.5], "rank": [16, 64]}
    >>> df = sl.sweep(grid, traces={"smollm2": "smollm2.zarr"})          # LocalCluster
    >>> df = sl.sweep(grid, traces=..., client="tcp://scheduler:8786")   # a real cluster
    >>> df = sl.sweep(grid, traces=..., client=False)                    # serial, in process

Each cell opens its model's recording (a ``.zarr`` store or ``.trace`` file, shared on
disk), splits it by sequence (the same split for every cell), trains low-rank predictors
on the training sequences with the cell's rule as labels and evaluates them on the
held-out ones: one row per (cell, layer), the cell's config in every row. Cells run
with one torch thread, so a cell's numbers do not depend on where it ran: the sweep on
a cluster equals the serial one. ``cache_dir``: each finished cell is written there as
JSON (keyed by a digest of its config and trace) and skipped when the sweep is rerun,
so an interrupted sweep resumes.

:func:`train_layers` runs predictor training one task per layer on the same client.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch

__all__ = ["CELL_KEYS", "cells", "run_cell", "sweep", "train_layers"]

CELL_KEYS = ("model", "rule", "density", "rank", "layers")
_DENSITY_RULES = ("Calibrated", "GateThreshold", "TopK")


def cells(grid: Mapping[str, Sequence[Any]] | Sequence[Mapping[str, Any]], models: Sequence[str]) -> list[dict]:
    """The grid's cells as dicts with every key of :data:`CELL_KEYS` (checked, no work done).

        >>> cells({"density": [0.3, 0.5], "rank": [16]}, models=["smollm2"])
    """
    if isinstance(grid, Mapping):
        unknown = set(grid) - set(CELL_KEYS)
        if unknown:
            raise ValueError(f"unknown grid keys {sorted(unknown)}; use {CELL_KEYS}")
        keys = list(grid)
        values = [list(grid[k]) if isinstance(grid[k], (list, tuple)) else [grid[k]] for k in keys]
        raw = [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*values)]
    else:
        raw = [dict(c) for c in grid]
    out = []
    for cell in raw:
        cell = {"model": models[0] if len(models) == 1 else None, "rule": "Calibrated", "density": 0.5,
                "rank": 32, "layers": None, **cell}
        if cell["model"] not in models:
            raise ValueError(f"cell {cell}: model must be one of {list(models)} (the traces given)")
        if cell["rule"] not in _DENSITY_RULES:
            raise ValueError(f"cell {cell}: rule must be one of {_DENSITY_RULES}")
        if not 0 < float(cell["density"]) <= 1:
            raise ValueError(f"cell {cell}: density must be in (0, 1]")
        if not isinstance(cell["rank"], int) or cell["rank"] < 1:
            raise ValueError(f"cell {cell}: rank must be an int >= 1")
        if cell["layers"] is not None:
            cell["layers"] = [int(x) for x in cell["layers"]]
        out.append(cell)
    if not out:
        raise ValueError("the grid has no cells")
    return out


def _rule(cell: dict):
    from sparselab.masking import rules

    if cell["rule"] == "TopK":
        return rules.TopK(keep=float(cell["density"]))
    return rules.RULES[cell["rule"]](density=float(cell["density"]))


def _open(path: str):
    from sparselab.recording.trace import Trace
    from sparselab.recording.zarr_store import is_zarr_path

    return Trace.open(path) if is_zarr_path(path) else Trace.load(path)


def _key(cell: dict, path: str, settings: dict) -> str:
    stat = Path(path).stat()
    blob = json.dumps([cell, str(Path(path).resolve()), stat.st_mtime_ns, settings], sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def run_cell(cell: dict, path: str, held_out: float = 0.25, seed: int = 0, epochs: int = 4) -> list[dict]:
    """One cell: split, train on the training sequences, evaluate on the held-out ones.

    Runs with one torch thread (restored after), so the numbers are the same on any worker.
    """
    from sparselab._version import versions
    from sparselab.prediction.training import split_sequences, train_predictors

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trace = _open(path)
        train, test = split_sequences(trace, held_out=held_out, seed=seed)
        layers = cell["layers"] if cell["layers"] is not None else list(trace.layers)
        rule = _rule(cell).fit(train) if cell["rule"] != "TopK" else _rule(cell)
        predictors = train_predictors(train, rule=rule, rank=cell["rank"], layers=layers, epochs=epochs,
                                      seed=seed, progress=False, target_density=float(cell["density"]))
        frame = predictors.evaluate(test)
    finally:
        torch.set_num_threads(before)
    keep = ["layer", "recall", "precision", "f1", "predicted_density", "true_density", "mass_kept"]
    rows = frame[[c for c in keep if c in frame.columns]].to_dict("records")
    config = {**cell, "layers": None if cell["layers"] is None else ",".join(map(str, cell["layers"])),
              "held_out": held_out, "seed": seed, "epochs": epochs, "n_train_tokens": train.n_tokens,
              "n_test_tokens": test.n_tokens}
    stamp = {f"version_{k}": v for k, v in versions().items()}
    return [{**config, **{k: (float(v) if k != "layer" else int(v)) for k, v in r.items()}, **stamp}
            for r in rows]


@contextlib.contextmanager
def _client(client):
    """The Dask client to submit to: a LocalCluster of 2 single-thread workers when
    ``client`` is None, or a new client of a scheduler address; closed (with its cluster)
    on exit only when made here."""
    from dask.distributed import Client, LocalCluster

    if client is not None and not isinstance(client, str):
        yield client
        return
    made = Client(LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                               dashboard_address=":0")) if client is None else Client(client)
    try:
        yield made
    finally:
        cluster = getattr(made, "cluster", None)
        made.close()
        if cluster is not None:
            cluster.close()


def sweep(grid, traces: Mapping[str, str | os.PathLike] | str | os.PathLike, client=None,
          cache_dir: str | os.PathLike | None = None, held_out: float = 0.25, seed: int = 0,
          epochs: int = 4, progress: bool = True) -> pd.DataFrame:
    """Run every cell of ``grid`` as a Dask task; one tidy row per (cell, layer).

        >>> df = sl.sweep({"density": [0.3, 0.5], "rank": [16, 32]}, traces="train.zarr")

    ``traces``: ``{model name: recording path}`` (or one path, model ``"default"``).
    ``client``: None (a new 2-worker ``LocalCluster``, closed after), a scheduler address,
    a ``dask.distributed.Client``, or False (serial, in this process). Columns: the cell
    (model, rule, density, rank, layers), settings, per-layer recall / precision / f1 /
    predicted and true density / mass kept, ``version_*``; ``df.attrs["dashboard"]`` is
    the cluster's dashboard link.
    """
    from tqdm.auto import tqdm

    if not isinstance(traces, Mapping):
        traces = {"default": traces}
    traces = {str(k): str(v) for k, v in traces.items()}
    for name, path in traces.items():
        if not Path(path).exists():
            raise FileNotFoundError(f"trace of model {name!r} not found at {path}")
    todo = cells(grid, list(traces))
    settings = {"held_out": held_out, "seed": seed, "epochs": epochs}
    cache = Path(cache_dir) if cache_dir is not None else None
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
    results: dict[int, list[dict]] = {}
    pending = []
    for i, cell in enumerate(todo):
        key = _key(cell, traces[cell["model"]], settings)
        file = cache / f"cell-{key}.json" if cache is not None else None
        if file is not None and file.is_file():
            results[i] = json.loads(file.read_text())
        else:
            pending.append((i, cell, file))
    dashboard = None

    def done(i, rows, file):
        results[i] = rows
        if file is not None:  # temp + rename: a killed sweep never leaves half a cell
            tmp = file.with_suffix(".tmp")
            tmp.write_text(json.dumps(rows))
            os.replace(tmp, file)

    bar = tqdm(total=len(todo), initial=len(results), desc="sweep", unit="cell", disable=not progress)
    if client is False:
        for i, cell, file in pending:
            done(i, run_cell(cell, traces[cell["model"]], held_out, seed, epochs), file)
            bar.update()
    elif pending:
        from dask.distributed import as_completed

        with _client(client) as dask_client:
            dashboard = dask_client.dashboard_link
            futures = {dask_client.submit(run_cell, cell, traces[cell["model"]], held_out, seed, epochs,
                                          pure=False): (i, file) for i, cell, file in pending}
            for future in as_completed(futures):
                i, file = futures[future]
                done(i, future.result(), file)
                bar.update()
    bar.close()
    df = pd.DataFrame([row for i in sorted(results) for row in results[i]])
    df.attrs["dashboard"] = dashboard
    return df


def _train_one(path: str, layer: int, kwargs: dict):
    from sparselab.prediction.training import train_predictors

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        p = train_predictors(_open(path), layers=[layer], progress=False, **kwargs)
    finally:
        torch.set_num_threads(before)
    return p


def train_layers(path: str | os.PathLike, layers: Sequence[int], client=None, **kwargs):
    """Train predictors one Dask task per layer; merged into one :class:`Predictors`.

        >>> predictors = train_layers("train.zarr", range(30), rank=64, rule=rule)

    Each layer trains with its own generator seeded with ``seed`` (so a layer's weights
    equal ``train_predictors(trace, layers=[layer], ...)``; a joint serial call draws
    one generator through all layers, so its numbers differ). Pass a fitted ``rule``.
    """
    from sparselab.prediction.lowrank import Predictors

    path = str(path)
    rule = kwargs.get("rule")
    if rule is not None and not rule.fitted:
        raise ValueError("pass a fitted rule (rule.fit(trace)): each layer task would refit it")
    with _client(client) as dask_client:
        futures = [dask_client.submit(_train_one, path, int(layer), kwargs, pure=False) for layer in layers]
        parts = dask_client.gather(futures)
    first = parts[0]
    return Predictors(
        {k: v for p in parts for k, v in p._weights.items()}, first.rule, policy=first.policy,
        lookahead=first.lookahead, calibration={k: v for p in parts for k, v in p.calibration.items()},
        model=first.model, activation=first.activation, config={**first.config, "per_layer_tasks": True},
        layer_info={k: v for p in parts for k, v in p.layer_info.items()}, versions=first.versions,
    )
