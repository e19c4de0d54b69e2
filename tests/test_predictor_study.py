"""sl.predictor_study: rank / input sweeps and the random-mask baseline."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

import sparselab as sl
from sparselab.studies import predictor_study

H, N, TRUE_RANK = 24, 64, 4


def low_rank_trace(n_seq=24, seq_len=25, seed=0, layers=(0, 2)) -> sl.Trace:
    """|h| = softplus of a rank-4 map of mlp_in; layer_in = mlp_in + small noise."""
    g = torch.Generator().manual_seed(seed)
    t = n_seq * seq_len
    xs, looks, hs = [], [], []
    for _ in layers:
        x = torch.randn(t, H, generator=g)
        u, v = torch.randn(H, TRUE_RANK, generator=g), torch.randn(TRUE_RANK, N, generator=g)
        hs.append(torch.nn.functional.softplus(x @ u @ v / math.sqrt(H) + 0.3 * torch.randn(N, generator=g)))
        xs.append(x)
        looks.append(x + 0.1 * torch.randn(t, H, generator=g))
    model = {"model_type": "synthetic", "hidden_size": H, "intermediate_size": N,
             "num_hidden_layers": max(layers) + 1}
    return sl.Trace(layers=layers, arrays={"h": torch.stack(hs), "mlp_in": torch.stack(xs),
                                           "layer_in": torch.stack(looks)},
                    token_ids=np.zeros(t, dtype=np.int64), seq_ids=np.repeat(np.arange(n_seq), seq_len),
                    positions=np.tile(np.arange(seq_len), n_seq), steps=np.zeros(t, dtype=np.int64),
                    is_prefill=np.ones(t, dtype=bool), meta={"model": model, "activation": "silu"})


@pytest.fixture(scope="module")
def sweep():
    train, test = sl.prediction.split_sequences(low_rank_trace(), held_out=0.25)
    return predictor_study.predictor_sweep(train, test, ranks=(1, 8), lookaheads=(False, True), epochs=15,
                                           lr=1e-2, batch_size=128, progress=False)


def test_random_baseline_matches_drawn_random_masks():
    rng = np.random.default_rng(0)
    labels = rng.random((4000, 50)) < 0.3
    mags = rng.exponential(size=(4000, 50))
    pred = rng.random((4000, 50)) < 0.6  # independent of the labels
    tp = (pred & labels).sum()
    df = predictor_study.random_baseline(pd.DataFrame({"predicted_density": [pred.mean()],
                                                       "true_density": [labels.mean()]}))
    row = df.iloc[0]
    assert row.random_recall == pytest.approx(tp / labels.sum(), abs=0.01)
    assert row.random_precision == pytest.approx(tp / pred.sum(), abs=0.01)
    assert row.random_f1 == pytest.approx(2 * tp / (pred.sum() + labels.sum()), abs=0.01)
    assert row.random_mass_kept == pytest.approx(mags[pred].sum() / mags.sum(), abs=0.01)
    with pytest.raises(ValueError, match="needs columns"):
        predictor_study.random_baseline(pd.DataFrame({"recall": [0.5]}))


def test_sweep_rows_and_columns(sweep):
    assert len(sweep) == 2 * 2 * 2  # inputs x ranks x layers
    assert set(sweep["input"]) == set(predictor_study.INPUTS.values())
    assert sorted(sweep["rank"].unique()) == [1, 8]
    for col in ("recall", "precision", "f1", "predicted_density", "mass_kept", "random_recall", "train_seconds"):
        assert sweep[col].notna().all(), col
    assert sweep.attrs["config"]["ranks"] == [1, 8]
    assert sweep.target_density.isna().all()  # scored under the training policy


def test_sweep_rank_and_baseline_behaviour(sweep):
    # the labels need rank 4: rank 8 recovers them far better than rank 1, and both beat a
    # random mask of their own density
    own = sweep[sweep["input"] == predictor_study.INPUTS[False]]
    by_rank = own.pivot(index="layer", columns="rank", values="f1")
    assert (by_rank[8] > by_rank[1] + 0.1).all()
    assert (own.recall > own.random_recall).all() and (own.mass_kept > own.random_mass_kept).all()
    assert (own[own["rank"] == 8].recall > 0.85).all()
    # layer_in is mlp_in plus small noise here: look-ahead predictors are almost as good
    look = sweep[sweep["input"] == predictor_study.INPUTS[True]]
    gap = own.set_index(["layer", "rank"]).recall - look.set_index(["layer", "rank"]).recall
    assert gap.abs().max() < 0.1


def test_sweep_errors():
    trace = low_rank_trace(n_seq=4)
    with pytest.raises(ValueError, match="at least one rank"):
        predictor_study.predictor_sweep(trace, trace, ranks=())
    train, test = sl.prediction.split_sequences(trace, held_out=0.25)
    with pytest.raises(ValueError, match="same trace"):
        predictor_study.predictor_sweep(train, train, ranks=(2,))
    with pytest.raises(ValueError, match="lookaheads"):
        predictor_study.predictor_sweep(train, test, lookaheads=())
    with pytest.raises(ValueError, match="densities must be"):
        predictor_study.predictor_sweep(train, test, densities=(0.0,))


def test_sweep_at_several_densities():
    train, test = sl.prediction.split_sequences(low_rank_trace(n_seq=12, layers=(1,)), held_out=0.25)
    df = predictor_study.predictor_sweep(train, test, ranks=(4,), densities=(0.2, 0.6), epochs=5, progress=False)
    assert list(df.target_density) == [0.2, 0.6]
    # re-thresholded on the training score quantiles: held-out density near the target
    np.testing.assert_allclose(df.predicted_density, [0.2, 0.6], atol=0.06)
    assert df.recall.iloc[1] > df.recall.iloc[0]  # keeping more finds more
    np.testing.assert_allclose(df.random_recall, df.predicted_density)
