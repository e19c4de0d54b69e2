"""sl.metrics against hand-computed examples and brute-force numpy references."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from sparselab import metrics
from sparselab.masking.masks import Masks
from sparselab.recording import Trace

N = 70  # two uint64 words, so word boundaries are exercised


def _dense(active_sets: list[set[int]], n: int = N) -> np.ndarray:
    out = np.zeros((len(active_sets), n), dtype=bool)
    for t, s in enumerate(active_sets):
        out[t, list(s)] = True
    return out


# two sequences of three tokens; seq 1 would look very different from the end of seq 0
SEQ_A = [{0, 1, 65}, {1, 2, 65, 66}, {2}]
SEQ_B = [{69}, {0, 69}, set()]


def _hand_masks(order: list[int] | None = None) -> Masks:
    dense = _dense(SEQ_A + SEQ_B)
    seq_ids = np.array([0, 0, 0, 1, 1, 1])
    positions = np.array([0, 1, 2, 0, 1, 2])
    if order is not None:
        dense, seq_ids, positions = dense[order], seq_ids[order], positions[order]
    return Masks.from_bool(dense, seq_ids=seq_ids, positions=positions, rule={"name": "hand"})


def _trace(h: np.ndarray, seq_ids=None, positions=None, gate: np.ndarray | None = None) -> Trace:
    """A Trace built directly from arrays ``[layers, tokens, neurons]`` (no model)."""
    n_layers, n_tokens, _ = h.shape
    arrays = {"h": torch.tensor(h, dtype=torch.float16)}
    if gate is not None:
        arrays["gate"] = torch.tensor(gate, dtype=torch.float16)
    return Trace(
        layers=tuple(range(n_layers)),
        arrays=arrays,
        token_ids=np.arange(n_tokens),
        seq_ids=np.zeros(n_tokens, dtype=np.int64) if seq_ids is None else seq_ids,
        positions=np.arange(n_tokens) if positions is None else positions,
        steps=np.zeros(n_tokens, dtype=np.int64),
        is_prefill=np.ones(n_tokens, dtype=bool),
    )


# ----------------------------------------------------------------------------- density


def test_density_counts_and_columns():
    df = metrics.density(_hand_masks())
    assert list(df.columns) == ["layer", "token", "seq_id", "position", "active", "density"]
    assert df["active"].tolist() == [3, 4, 1, 1, 2, 0]
    np.testing.assert_allclose(df["density"], np.array([3, 4, 1, 1, 2, 0]) / N)
    assert df.attrs["rule"] == {"name": "hand"}
    assert "numpy" in df.attrs["versions"]


def test_density_layers_are_long_format():
    dense = np.stack([_dense(SEQ_A), _dense([{5}, set(), {1, 2, 3}])])
    df = metrics.density(Masks.from_bool(dense, layers=(3, 7)))
    assert df["layer"].tolist() == [3, 3, 3, 7, 7, 7]
    assert df["active"].tolist() == [3, 4, 1, 1, 0, 3]


def test_metrics_reject_non_masks():
    with pytest.raises(TypeError, match="Masks"):
        metrics.density(np.zeros((2, 3), dtype=bool))


# ----------------------------------------------------------------------------- churn


def test_churn_hand_example_never_crosses_sequences():
    df = metrics.churn(_hand_masks())
    # first token of each sequence has no predecessor: 4 rows, not 5
    assert df[["seq_id", "position"]].values.tolist() == [[0, 1], [0, 2], [1, 1], [1, 2]]
    assert df["added"].tolist() == [2, 0, 1, 0]
    assert df["removed"].tolist() == [1, 3, 0, 2]
    assert df["active"].tolist() == [4, 1, 2, 0]
    np.testing.assert_allclose(df["churn"], np.array([3, 3, 1, 2]) / N)
    d_prev, d_now = 3 / N, 4 / N
    assert df["random_churn"].iloc[0] == pytest.approx(d_prev * (1 - d_now) + d_now * (1 - d_prev))


def test_churn_uses_sequence_order_not_storage_order():
    shuffled = [4, 0, 5, 2, 3, 1]
    ordered = metrics.churn(_hand_masks())
    permuted = metrics.churn(_hand_masks(shuffled)).sort_values(["seq_id", "position"])
    cols = ["seq_id", "position", "added", "removed", "active"]
    assert permuted[cols].values.tolist() == ordered[cols].values.tolist()
    # token indices refer to the permuted storage
    assert permuted["token"].tolist() == [shuffled.index(i) for i in (1, 2, 4, 5)]


@settings(max_examples=40, deadline=None)
@given(
    dense=arrays(bool, st.tuples(st.integers(1, 2), st.integers(2, 12), st.integers(1, 130))),
    data=st.data(),
)
def test_churn_matches_dense_xor(dense, data):
    n_layers, n_tokens, _ = dense.shape
    seq_ids = np.sort(np.array(data.draw(st.lists(st.integers(0, 2), min_size=n_tokens, max_size=n_tokens))))
    positions = np.concatenate([np.arange((seq_ids == s).sum()) for s in np.unique(seq_ids)])
    df = metrics.churn(Masks.from_bool(dense, seq_ids=seq_ids, positions=positions))
    rows = []
    for li in range(n_layers):
        for t in range(1, n_tokens):
            if seq_ids[t] == seq_ids[t - 1]:
                now, prev = dense[li, t], dense[li, t - 1]
                rows.append([li, t, int((now & ~prev).sum()), int((prev & ~now).sum()), int(now.sum())])
    assert df[["layer", "token", "added", "removed", "active"]].values.tolist() == rows


# ----------------------------------------------------------------------------- windows


def _window_reference(dense: np.ndarray, seq_ids: np.ndarray, k: int):
    """Brute force over sets, one token at a time."""
    fps, news, dens = [], [], []
    for s in np.unique(seq_ids):
        seq = dense[seq_ids == s]
        for t in range(k, len(seq)):
            fps.append(np.logical_or.reduce(seq[t - k + 1 : t + 1]).sum())
            news.append((seq[t] & ~np.logical_or.reduce(seq[t - k : t])).sum())
            dens.append(seq[t].mean())
    if not fps:
        return np.nan, np.nan, np.nan, 0
    return np.mean(fps), np.mean(news), np.mean(dens), len(fps)


def test_window_reuse_hand_example():
    df = metrics.window_reuse(_hand_masks(), windows=(1, 2, 3))
    w1, w2, w3 = (df[df.window == k].iloc[0] for k in (1, 2, 3))
    assert w1.n_tokens == 4 and w2.n_tokens == 2 and w3.n_tokens == 0
    assert w1.footprint == pytest.approx((4 + 1 + 2 + 0) / 4 / N)
    assert w1.new_per_token == pytest.approx((2 + 0 + 1 + 0) / 4)  # = added
    assert w2.footprint == pytest.approx((4 + 2) / 2 / N)  # {1,2,65,66} and {0,69}
    assert w2.new_per_token == 0
    assert np.isnan(w3.footprint) and np.isnan(w3.new_fraction)


def test_window_reuse_matches_brute_force():
    rng = np.random.default_rng(1)
    n_tokens = 60
    # correlated masks (drifting) so reuse differs clearly from the random baseline
    dense = np.zeros((2, n_tokens, 130), dtype=bool)
    for li in range(2):
        state = rng.random(130) < 0.3
        for t in range(n_tokens):
            flip = rng.random(130) < 0.1
            state = state ^ flip
            dense[li, t] = state
    seq_ids = np.repeat([0, 1, 2], [25, 5, 30])
    positions = np.concatenate([np.arange(25), np.arange(5), np.arange(30)])
    windows = (1, 2, 3, 8, 26)
    df = metrics.window_reuse(Masks.from_bool(dense, seq_ids=seq_ids, positions=positions), windows)
    assert len(df) == 2 * len(windows)
    for li in range(2):
        for k in windows:
            row = df[(df.layer == li) & (df.window == k)].iloc[0]
            fp, new, d, count = _window_reference(dense[li], seq_ids, k)
            assert row.n_tokens == count
            assert row.footprint == pytest.approx(fp / 130)
            assert row.new_per_token == pytest.approx(new)
            assert row.new_fraction == pytest.approx(new / 130)
            assert row.density == pytest.approx(d)
            assert row.random_footprint == pytest.approx(1 - (1 - d) ** k)
            assert row.random_new_fraction == pytest.approx(d * (1 - d) ** k)


def test_window_reuse_validates_windows():
    with pytest.raises(ValueError, match="positive"):
        metrics.window_reuse(_hand_masks(), windows=(0, 2))


# ----------------------------------------------------------------------------- neurons


def test_neuron_frequency_hand_example():
    dense = np.array([[1, 0, 0, 1], [1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=bool)
    df = metrics.neuron_frequency(Masks.from_bool(dense))
    np.testing.assert_allclose(df["frequency"], [0.75, 0.25, 0.0, 0.25])
    assert df["rank"].tolist() == [1, 2, 4, 3]  # tie between neurons 1 and 3: lower index first
    np.testing.assert_allclose(df["cum_share"], [3 / 5, 4 / 5, 1.0, 1.0])
    np.testing.assert_allclose(df["rank_fraction"], [0.25, 0.5, 1.0, 0.75])


def test_neuron_frequency_empty_layer_is_nan():
    df = metrics.neuron_frequency(Masks.from_bool(np.zeros((3, 5), dtype=bool)))
    assert df["frequency"].eq(0).all() and df["cum_share"].isna().all()


# ----------------------------------------------------------------------------- batches


def test_sample_batches_are_distinct_and_reproducible():
    a = metrics.sample_batches(50, 8, 30, seed=3)
    assert a.shape == (30, 8)
    assert all(len(set(row)) == 8 for row in a)
    np.testing.assert_array_equal(a, metrics.sample_batches(50, 8, 30, seed=3))
    assert not np.array_equal(a, metrics.sample_batches(50, 8, 30, seed=4))


def test_batch_union_matches_brute_force():
    rng = np.random.default_rng(0)
    dense = rng.random((2, 40, 130)) < np.array([0.1, 0.4])[:, None, None]
    masks = Masks.from_bool(dense, layers=(4, 9))
    df = metrics.batch_union(masks, sizes=(1, 3, 10), n_batches=25, seed=7)
    for li, layer in enumerate((4, 9)):
        p = dense[li].mean()
        for size in (1, 3, 10):
            idx = metrics.sample_batches(40, size, 25, seed=7)
            unions = np.array([np.logical_or.reduce(dense[li][b]).mean() for b in idx])
            row = df[(df.layer == layer) & (df["size"] == size)].iloc[0]
            assert row.union_density == pytest.approx(unions.mean())
            assert row.union_std == pytest.approx(unions.std(ddof=1))
            assert row.independent == pytest.approx(1 - (1 - p) ** size)
            assert row.density == pytest.approx(p)


def test_batch_union_disjoint_and_identical_masks():
    one_hot = np.eye(16, 20, dtype=bool)  # token t fires neuron t only
    df = metrics.batch_union(Masks.from_bool(one_hot), sizes=(1, 4, 16), n_batches=10)
    np.testing.assert_allclose(df["union_density"], [1 / 20, 4 / 20, 16 / 20])
    np.testing.assert_allclose(df["union_std"], 0.0)
    same = np.tile(np.arange(20) % 3 == 0, (16, 1))
    df = metrics.batch_union(Masks.from_bool(same), sizes=(2, 8), n_batches=10)
    np.testing.assert_allclose(df["union_density"], same[0].mean())


def test_batch_union_rejects_batches_larger_than_trace():
    with pytest.raises(ValueError, match="exceeds"):
        metrics.batch_union(_hand_masks(), sizes=(2, 7))


# ----------------------------------------------------------------------------- with a trace


def test_mass_kept_hand_example():
    h = np.array([[[1, -2, 1], [0, 0, 0], [3, -1, 0]]], dtype=np.float32)
    trace = _trace(h)
    masks = Masks.from_bool(np.array([[1, 0, 1], [1, 1, 1], [0, 1, 0]], dtype=bool))
    df = metrics.mass_kept(masks, trace)
    assert df["mass_kept"].iloc[0] == pytest.approx(0.5)
    assert np.isnan(df["mass_kept"].iloc[1])
    assert df["mass_kept"].iloc[2] == pytest.approx(0.25)


def test_mass_kept_rejects_foreign_masks():
    trace = _trace(np.ones((1, 3, 4), dtype=np.float32))
    with pytest.raises(ValueError, match="do not belong"):
        metrics.mass_kept(Masks.from_bool(np.ones((4, 4), dtype=bool)), trace)


def test_activation_magnitude_matches_numpy():
    rng = np.random.default_rng(2)
    h = rng.normal(size=(3, 20, 16)).astype(np.float16) * np.array([0.1, 1.0, 5.0], dtype=np.float16)[:, None, None]
    df = metrics.activation_magnitude(_trace(h))
    mags = np.abs(h.astype(np.float32))
    np.testing.assert_allclose(df["median"], np.median(mags.reshape(3, -1), axis=1), rtol=1e-6)
    np.testing.assert_allclose(df["q90"], np.quantile(mags.reshape(3, -1), 0.9, axis=1), rtol=1e-6)
    assert df["median"].is_monotonic_increasing


def test_summary_agrees_with_the_per_token_frames():
    rng = np.random.default_rng(5)
    h = rng.normal(size=(2, 12, 70)).astype(np.float32)
    seq_ids = np.repeat([0, 1], 6)
    positions = np.tile(np.arange(6), 2)
    trace = _trace(h, seq_ids=seq_ids, positions=positions)
    masks = Masks.from_bool(np.abs(h) > 0.8, seq_ids=seq_ids, positions=positions)
    table = metrics.summary(masks, trace)
    assert list(table.columns) == ["layer", "density", "churn", "random_churn", "mass_kept"]
    ch = metrics.churn(masks)
    for li in range(2):
        row = table.iloc[li]
        assert row.density == pytest.approx((np.abs(h[li]) > 0.8).mean())
        assert row.churn == pytest.approx(ch[ch.layer == li].churn.mean())
        assert row.mass_kept == pytest.approx(metrics.mass_kept(masks, trace).query("layer == @li").mass_kept.mean())
    assert isinstance(metrics.summary(masks), pd.DataFrame) and "mass_kept" not in metrics.summary(masks)
