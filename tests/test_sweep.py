"""Sweeps and per-layer training on Dask (sparselab.studies.sweep): the same numbers as
the serial run, cached cells skipped on a rerun, grid errors before any work.

Clusters here are in-process (processes=False) with one single-thread worker: small and
fast on a shared 2-core machine.

    pytest -q tests/test_sweep.py
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import sparselab as sl
from sparselab.studies import sweep as sweep_mod
from sparselab.testing.tiny import tiny_llama


@pytest.fixture(scope="module")
def trace_path(tmp_path_factory):
    model = tiny_llama(vocab_size=64, hidden_size=32, intermediate_size=96, num_layers=2)
    ids = torch.randint(3, 64, (12, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), sl.Recorder(model) as rec:
        model(input_ids=ids)
    path = tmp_path_factory.mktemp("sweep") / "tiny.zarr"
    rec.trace.save(path)
    return path


@pytest.fixture(scope="module")
def client():
    from dask.distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0")
    c = Client(cluster)
    yield c
    c.close()
    cluster.close()


GRID = {"rule": ["Calibrated", "TopK"], "density": [0.3, 0.5], "rank": [4, 8]}


def test_sweep_on_dask_equals_serial_and_caches(trace_path, client, tmp_path, monkeypatch):
    serial = sweep_mod.sweep(GRID, {"tiny": trace_path}, client=False, epochs=2, progress=False)
    assert len(serial) == 8 * 2  # 8 cells x 2 layers
    assert set(serial.columns) >= {"model", "rule", "density", "rank", "layer", "recall", "mass_kept",
                                   "version_torch"}
    # the predicted density follows each cell's target (the config really reached the cell)
    assert np.allclose(serial.predicted_density, serial.density, atol=0.12)
    on_dask = sl.sweep(GRID, {"tiny": trace_path}, client=client, epochs=2, progress=False,
                       cache_dir=tmp_path / "cells")
    pd.testing.assert_frame_equal(serial, on_dask)
    assert on_dask.attrs["dashboard"]

    def boom(*args, **kwargs):
        raise AssertionError("a cached cell was run again")

    monkeypatch.setattr(sweep_mod, "run_cell", boom)
    again = sl.sweep(GRID, {"tiny": trace_path}, client=client, epochs=2, progress=False,
                     cache_dir=tmp_path / "cells")
    pd.testing.assert_frame_equal(serial, again)


def test_grid_errors_before_any_work(trace_path):
    with pytest.raises(ValueError, match="unknown grid keys"):
        sl.sweep({"densty": [0.5]}, trace_path, client=False)
    with pytest.raises(ValueError, match="model must be one of"):
        sl.sweep({"model": ["other"]}, {"tiny": trace_path}, client=False)
    with pytest.raises(ValueError, match="density"):
        sl.sweep({"density": [0.0]}, trace_path, client=False)
    with pytest.raises(FileNotFoundError):
        sl.sweep({"density": [0.5]}, {"tiny": trace_path.with_name("missing.zarr")}, client=False)


def test_train_layers_as_tasks(trace_path, client):
    trace = sl.Trace.open(trace_path).to_memory()
    rule = sl.rules.Calibrated(density=0.4).fit(trace)
    merged = sweep_mod.train_layers(trace_path, [0, 1], client=client, rule=rule, rank=4, epochs=2)
    assert merged.layers == (0, 1)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for layer in (0, 1):
            alone = sl.train_predictors(trace, rule=rule, rank=4, epochs=2, layers=[layer], progress=False)
            for a, b in zip(merged.layer_weights(layer), alone.layer_weights(layer), strict=True):
                assert torch.equal(a, b)
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="fitted"):
        sweep_mod.train_layers(trace_path, [0], client=client, rule=sl.rules.Calibrated(0.4))
