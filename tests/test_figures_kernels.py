"""sl.figures_kernels on small benchmark-shaped frames, and kernel_bench.update_sweep."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from sparselab.evaluation import kernel_bench
from sparselab.viz import kernels as figures_kernels


def _mlp_frame() -> pd.DataFrame:
    rows = []
    for d in (0.1, 0.5):
        for method, ms in (("dense_torch", 1.0), ("regather_matmul", 2 * d), ("cache_kernel", d),
                           ("index_kernel", 1.2 * d)):
            rows.append({"density": d, "method": method, "median_ms": ms, "q1_ms": 0.9 * ms,
                         "q3_ms": 1.2 * ms, "shape": "s", "dtype": "float32", "threads": 1})
    return pd.DataFrame(rows)


def test_mlp_time_vs_density_draws_the_bandwidth_line():
    fig = figures_kernels.mlp_time_vs_density(_mlp_frame())
    named = {(t.name, t.xaxis): t for t in fig.data}
    line = named[("bandwidth line: d x dense", "x")]
    np.testing.assert_allclose(line.y, [0.1, 0.5])
    np.testing.assert_allclose(named[("1 / d", "x2")].y, [10.0, 2.0])
    k1 = [t for t in fig.data if t.name == "over the cache (contiguous rows)"]
    np.testing.assert_allclose(k1[1].y, [10.0, 2.0])  # speedup = dense / kernel
    np.testing.assert_allclose(k1[0].error_y.array, 0.2 * np.array([0.1, 0.5]))
    assert fig.layout.yaxis.type == "log"
    with pytest.raises(ValueError, match="dense_torch"):
        figures_kernels.mlp_time_vs_density(_mlp_frame().query("method != 'dense_torch'"))
    mixed = _mlp_frame().assign(threads=[1, 2] * 4)
    with pytest.raises(ValueError, match="threads"):
        figures_kernels.mlp_time_vs_density(mixed)


def _update_frame() -> pd.DataFrame:
    rows = []
    for d, n_act in ((0.1, 10), (0.5, 50)):
        rows.append({"density": d, "n_active": n_act, "method": "full_regather", "neurons_swapped": 0,
                     "median_ms": n_act / 10, "rows_copied": n_act})
        for k in (1, 4):
            rows.append({"density": d, "n_active": n_act, "method": "update_rows", "neurons_swapped": k,
                         "median_ms": 0.01 * k, "rows_copied": k})
    return pd.DataFrame(rows)


def test_update_cost_panels():
    fig = figures_kernels.update_cost(_update_frame(), density=0.5, swaps=4)
    left_update, left_regather, right_update, right_regather = fig.data
    assert list(left_update.x) == [1, 4] and list(left_update.customdata) == [1, 4]
    assert list(left_regather.y) == [5.0, 5.0]
    assert list(right_update.x) == [10, 50] and list(right_update.y) == [0.04, 0.04]
    assert list(right_regather.y) == [1.0, 5.0]
    assert "50%" in fig.layout.annotations[0].text and "4 neurons" in fig.layout.annotations[1].text
    with pytest.raises(ValueError, match="density 0.3"):
        figures_kernels.update_cost(_update_frame(), density=0.3, swaps=4)


def test_update_sweep_counts_rows_structurally():
    threads = torch.get_num_threads()
    df = pd.DataFrame(kernel_bench.update_sweep(densities=(0.05, 0.5), swaps=(1, 16, 200), reps=1))
    assert torch.get_num_threads() == threads
    upd = df[df.method == "update_rows"]
    # paired replacement: a k-swap writes exactly the k entering neurons' rows, whatever
    # the active size; the re-gather writes every active row
    assert (upd.rows_copied == upd.neurons_swapped).all()
    reg = df[df.method == "full_regather"].set_index("density")
    assert reg.rows_copied.tolist() == reg.n_active.tolist() == [77, 768]
    assert (reg.bytes_moved == reg.n_active * 3 * 576 * 4).all()
    # 200 > 77 active neurons at 5 %: that swap is impossible and skipped
    assert sorted(upd[upd.density == 0.05].neurons_swapped) == [1, 16]
    assert sorted(upd[upd.density == 0.5].neurons_swapped) == [1, 16, 200]
