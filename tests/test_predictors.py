"""Low-rank predictors: training on synthetic data with a known answer, policies,
evaluation against numpy, persistence, and one short run on the real model."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import sparselab as sl
from sparselab.masking.rules import Calibrated, TopK
from sparselab.masking.thresholds import quantile_grid
from sparselab.prediction import (
    Policy,
    PredictorFileError,
    PredictorModelMismatch,
    Predictors,
    resolve_rank,
    split_sequences,
    train_predictors,
)

H, N, TRUE_RANK = 16, 32, 4


def _tiny_model(intermediate: int = N, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=H, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=2, vocab_size=64,
    )
    return LlamaForCausalLM(config)


def _identity(intermediate: int = N, layers: int = 2) -> dict:
    return {"name": "tiny", "model_type": "llama", "hidden_size": H,
            "intermediate_size": intermediate, "num_hidden_layers": layers, "dtype": "float32"}


def synthetic_trace(n_seq: int = 40, seq_len: int = 50, seed: int = 0, signal: str = "mlp_in",
                    layers: tuple[int, ...] = (0, 1)) -> sl.Trace:
    """h = softplus(x U V + c): |h| is a monotone function of a rank-4 linear map of x,
    so "|h| above a threshold" is linearly separable with rank 4 and needs rank >= 4.

    ``signal`` names the input array that carries x; the other one is independent noise.
    """
    g = torch.Generator().manual_seed(seed)
    t = n_seq * seq_len
    xs, noise, hs = [], [], []
    for _ in layers:
        x = torch.randn(t, H, generator=g)
        u = torch.randn(H, TRUE_RANK, generator=g)
        v = torch.randn(TRUE_RANK, N, generator=g)
        z = x @ u @ v / math.sqrt(H) + 0.3 * torch.randn(N, generator=g)
        xs.append(x)
        noise.append(torch.randn(t, H, generator=g))
        hs.append(torch.nn.functional.softplus(z))
    other = "layer_in" if signal == "mlp_in" else "mlp_in"
    arrays = {"h": torch.stack(hs), signal: torch.stack(xs), other: torch.stack(noise)}
    return sl.Trace(
        layers=layers,
        arrays=arrays,
        token_ids=np.zeros(t, dtype=np.int64),
        seq_ids=np.repeat(np.arange(n_seq), seq_len),
        positions=np.tile(np.arange(seq_len), n_seq),
        steps=np.zeros(t, dtype=np.int64),
        is_prefill=np.ones(t, dtype=bool),
        meta={"model": _identity(layers=max(layers) + 1), "activation": "silu"},
    )


@pytest.fixture(scope="module")
def data():
    trace = synthetic_trace()
    return split_sequences(trace, held_out=0.25, seed=0)


@pytest.fixture(scope="module")
def trained(data):
    train, _ = data
    return train_predictors(train, rank=TRUE_RANK, epochs=30, lr=1e-2, batch_size=128,
                            progress=False)


def _recall(pred: torch.Tensor, labels: torch.Tensor) -> float:
    return float((pred & labels).sum() / labels.sum())


# -- learning: the known answer ------------------------------------------------------------


def test_rank_r_predictor_learns_a_rank_r_rule_and_rank_1_cannot(data, trained):
    train, test = data
    rank1 = train_predictors(train, rank=1, epochs=30, lr=1e-2, batch_size=128, progress=False)
    for layer in train.layers:
        labels = trained.rule.mask(test.activations(layer), layer)
        x = test.mlp_inputs(layer)
        good = _recall(trained.mask(layer, x), labels)
        bad = _recall(rank1.mask(layer, x), labels)
        assert good > 0.95, (layer, good)
        assert bad < good - 0.1, (layer, bad, good)
    df = trained.evaluate(test)
    assert (df.recall > 0.95).all() and (df.precision > 0.95).all()
    # the default rule labels half of the neurons of every layer
    assert np.allclose(df.true_density, 0.5, atol=0.05)


def test_lookahead_reads_the_layer_input():
    train, test = split_sequences(synthetic_trace(signal="layer_in", n_seq=24), held_out=0.25)
    kwargs = dict(rank=TRUE_RANK, epochs=20, lr=1e-2, batch_size=128, progress=False, layers=[0])
    ahead = train_predictors(train, lookahead=True, **kwargs)
    plain = train_predictors(train, lookahead=False, **kwargs)
    assert ahead.lookahead and ahead.input_name == "layer_in"
    assert ahead.evaluate(test).recall[0] > 0.9
    # the MLP input is noise here: no better than the density baseline (+ small slack)
    assert plain.evaluate(test).recall[0] < 0.62


def test_rank_search_keeps_the_rank_that_suffices():
    train = synthetic_trace(n_seq=24, layers=(0,))
    p = train_predictors(train, rank_search=[1, TRUE_RANK], epochs=20, lr=1e-2, batch_size=128,
                         progress=False)
    assert p.rank(0) == TRUE_RANK
    search = p.layer_info[0]["search"]
    assert [s["rank"] for s in search] == [1, TRUE_RANK]
    assert search[1]["val_f1"] > search[0]["val_f1"]
    # with a huge tolerance the smallest rank wins
    small = train_predictors(train, rank_search=[1, TRUE_RANK], epochs=2, progress=False,
                             rank_tolerance=1.0)
    assert small.rank(0) == 1


@pytest.mark.parametrize("loss", ["bce", "mass", "logmag"])
def test_every_loss_learns(data, loss):
    train, test = data
    p = train_predictors(train, rank=TRUE_RANK, epochs=15, lr=1e-2, batch_size=128, loss=loss,
                         progress=False, layers=[1])
    assert p.evaluate(test).recall[0] > 0.9
    assert p.config["loss"] == loss


def test_class_imbalance_sets_pos_weight():
    train = synthetic_trace(n_seq=10, layers=(0,))
    p = train_predictors(train, rule=Calibrated(density=0.1), rank=2, epochs=1, loss="bce",
                         progress=False)
    assert p.layer_info[0]["label_density"] == pytest.approx(0.1, abs=0.01)
    assert p.layer_info[0]["pos_weight"] == pytest.approx(9.0, rel=0.1)


def test_split_sequences_never_cuts_a_sequence():
    trace = synthetic_trace(n_seq=8, seq_len=5)
    train, test = split_sequences(trace, held_out=0.25, seed=1)
    assert train.n_sequences == 6 and test.n_sequences == 2
    assert not set(train.seq_ids) & set(test.seq_ids)
    assert train.n_tokens + test.n_tokens == trace.n_tokens
    again, _ = split_sequences(trace, held_out=0.25, seed=1)
    assert np.array_equal(again.seq_ids, train.seq_ids)
    with pytest.raises(ValueError, match="1 sequence"):
        split_sequences(trace.select_sequences([0]))


def test_bfloat16_copy_halves_the_bytes(data, trained):
    _, test = data
    half = trained.to(torch.bfloat16)
    assert half.bytes * 2 == trained.bytes and half.dtype == torch.bfloat16
    x = test.mlp_inputs(0)
    agree = (half.mask(0, x) == trained.mask(0, x)).float().mean()
    assert agree > 0.97


def test_seeded_training_is_reproducible(data):
    train, _ = data
    kwargs = dict(rank=2, epochs=2, progress=False, layers=[0])
    a, b = train_predictors(train, seed=3, **kwargs), train_predictors(train, seed=3, **kwargs)
    c = train_predictors(train, seed=4, **kwargs)
    x = train.mlp_inputs(0)
    assert torch.equal(a.scores(0, x), b.scores(0, x))
    assert not torch.equal(a.scores(0, x), c.scores(0, x))


def test_rank_as_fraction_and_bad_arguments(data):
    train, _ = data
    assert resolve_rank(0.25, N, H) == 8
    assert resolve_rank(3, N, H) == 3
    with pytest.raises(ValueError, match="rank"):
        resolve_rank(H + 1, N, H)
    with pytest.raises(ValueError, match="fraction"):
        resolve_rank(1.5, N, H)
    p = train_predictors(train, rank=0.125, epochs=1, progress=False, layers=[0])
    assert p.rank(0) == 4
    with pytest.raises(ValueError, match="loss"):
        train_predictors(train, loss="hinge")
    with pytest.raises(KeyError, match="layer 7"):
        train_predictors(train, layers=[7])
    with pytest.raises(ValueError, match="at most one"):
        train_predictors(train, target_density=0.5, top_k=3)
    no_input = sl.Trace(layers=train.layers, arrays={"h": train.arrays["h"]},
                        **{f: getattr(train, f) for f in sl.recording.TOKEN_FIELDS})
    with pytest.raises(KeyError, match="mlp_in"):
        train_predictors(no_input)


# -- policies ---------------------------------------------------------------------------


@pytest.mark.parametrize("density", [0.1, 0.3, 0.5, 0.8])
def test_target_density_is_reached_on_training_data(data, trained, density):
    train, _ = data
    p = trained.with_policy(target_density=density)
    assert p.policy == Policy("density", density)
    for layer in p.layers:
        got = p.mask(layer, train.mlp_inputs(layer)).float().mean().item()
        assert got == pytest.approx(density, abs=0.005)
        # the same result through a per-call override of the stored policy
        assert torch.equal(trained.mask(layer, train.mlp_inputs(layer), target_density=density),
                           p.mask(layer, train.mlp_inputs(layer)))


def test_target_recall_is_reached_on_training_data(data, trained):
    train, _ = data
    p = trained.with_policy(target_recall=0.8)
    for layer in p.layers:
        labels = p.rule.mask(train.activations(layer), layer)
        assert _recall(p.mask(layer, train.mlp_inputs(layer)), labels) == pytest.approx(0.8, abs=0.005)


def test_top_k_and_union(data, trained):
    _, test = data
    x = test.mlp_inputs(0)[:10]
    counts = trained.with_policy(top_k=5).mask(0, x).sum(1)
    assert (counts == 5).all()
    assert (trained.mask(0, x, top_k=0.25).sum(1) == 8).all()
    union = trained.union_mask(0, x)
    assert union.shape == (N,) and union.dtype == torch.bool
    assert torch.equal(union, trained.mask(0, x).any(0))
    one = trained.mask(0, x[0])
    assert one.shape == (N,) and torch.equal(one, trained.mask(0, x)[0])


def test_calibrate_on_another_trace(data, trained):
    _, test = data
    p = trained.calibrate(test, target_density=0.4)
    for layer in p.layers:
        got = p.mask(layer, test.mlp_inputs(layer)).float().mean().item()
        assert got == pytest.approx(0.4, abs=0.005)
    assert trained.policy == Policy("density", 0.5)  # the original is unchanged


def test_quantile_grid_matches_numpy():
    values = torch.randn(1000, generator=torch.Generator().manual_seed(1))
    grid = quantile_grid(values, n=11)
    expected = np.quantile(values.numpy(), np.linspace(0, 1, 11), method="nearest")
    np.testing.assert_allclose(grid.numpy(), expected, atol=1e-6)


def test_policy_validation(trained):
    with pytest.raises(ValueError, match="give one of"):
        trained.with_policy()
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        trained.with_policy(target_recall=1.5)
    with pytest.raises(ValueError, match="top_k"):
        trained.with_policy(top_k=-1)
    with pytest.raises(KeyError, match="no predictor for layer 9"):
        trained.mask(9, torch.zeros(1, H))
    with pytest.raises(ValueError, match="hidden size"):
        trained.scores(0, torch.zeros(1, H + 1))


# -- evaluate against numpy ----------------------------------------------------------------


def test_evaluate_matches_numpy_recomputation():
    g = torch.Generator().manual_seed(5)
    t, hid, n = 12, 3, 6
    x = torch.randn(1, t, hid, generator=g)
    h = torch.randn(1, t, n, generator=g)
    trace = sl.Trace(layers=(2,), arrays={"h": h, "mlp_in": x},
                     token_ids=np.zeros(t), seq_ids=np.zeros(t), positions=np.arange(t),
                     steps=np.zeros(t), is_prefill=np.ones(t, dtype=bool))
    first = torch.randn(2, hid, generator=g)
    second = torch.randn(n, 2, generator=g)
    bias = torch.randn(n, generator=g)
    rule = TopK(keep=3)
    p = Predictors({2: (first, second, bias)}, rule, policy=Policy("top_k", 2))
    row = p.evaluate(trace).iloc[0]

    xn, hn = x[0].numpy().astype(np.float64), np.abs(h[0].numpy().astype(np.float64))
    scores = xn @ first.numpy().T.astype(np.float64) @ second.numpy().T + bias.numpy()
    pred = np.zeros((t, n), bool)
    np.put_along_axis(pred, np.argsort(-scores, axis=1)[:, :2], True, axis=1)
    labels = np.zeros((t, n), bool)
    np.put_along_axis(labels, np.argsort(-hn, axis=1)[:, :3], True, axis=1)
    tp = (pred & labels).sum()
    assert row.recall == pytest.approx(tp / labels.sum())
    assert row.precision == pytest.approx(tp / pred.sum())
    assert row.f1 == pytest.approx(2 * tp / (pred.sum() + labels.sum()))
    assert row.predicted_density == pytest.approx(2 / n)
    assert row.true_density == pytest.approx(3 / n)
    assert row.mass_kept == pytest.approx(hn[pred].sum() / hn.sum())
    assert row.energy_kept == pytest.approx((hn**2)[pred].sum() / (hn**2).sum())
    assert row.label_mass_kept == pytest.approx(hn[labels].sum() / hn.sum())
    top2 = -np.sort(-hn, axis=1)[:, :2].sum()
    assert row.oracle_mass_kept == pytest.approx(top2 / hn.sum())
    assert row["rank"] == 2 and row.layer == 2
    assert p.n_params == 2 * hid + n * 2 + n
    assert p.bytes == 4 * p.n_params


# -- persistence ----------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path, data, trained):
    _, test = data
    p = trained.with_policy(target_recall=0.85)
    out = p.save(tmp_path / "preds")
    assert sorted(f.name for f in out.iterdir()) == ["predictors.json", "predictors.safetensors"]
    assert [f.name for f in tmp_path.iterdir()] == ["preds"]  # no temp dir left behind
    config = json.loads((out / "predictors.json").read_text())
    assert config["rule"]["name"] == "Calibrated" and config["policy"]["kind"] == "recall"
    assert config["model"]["model_type"] == "llama" and "torch" in config["versions"]
    assert config["training"]["epochs"] == 30 and config["training"]["seconds"] > 0
    loaded = Predictors.load(out)
    assert loaded.policy == p.policy and loaded.thresholds == p.thresholds
    assert loaded.rule == p.rule and loaded.ranks == p.ranks and loaded.bytes == p.bytes
    for layer in p.layers:
        x = test.mlp_inputs(layer)
        assert torch.equal(loaded.scores(layer, x), p.scores(layer, x))
        assert torch.equal(loaded.mask(layer, x), p.mask(layer, x))
    # re-thresholding after loading uses the saved calibration statistics
    assert loaded.with_policy(target_density=0.3).thresholds == p.with_policy(target_density=0.3).thresholds
    # saving again replaces the directory
    trained.save(out)
    assert Predictors.load(out).policy == trained.policy


def test_load_checks_the_model(tmp_path, trained):
    path = trained.save(tmp_path / "preds")
    Predictors.load(path, model=_tiny_model())  # same identity: fine
    with pytest.raises(PredictorModelMismatch, match="intermediate_size 32 != 48"):
        Predictors.load(path, model=_tiny_model(intermediate=48))
    with pytest.raises(PredictorModelMismatch, match="num_hidden_layers 2 != 1"):
        trained.check_model(_tiny_model(layers=1))
    # without a recorded identity, sizes come from the weights and layers are bounded
    anonymous = Predictors({5: (torch.zeros(1, H), torch.zeros(N, 1), torch.zeros(N))},
                           TopK(keep=3), policy=Policy("top_k", 3))
    with pytest.raises(PredictorModelMismatch, match="layers \\[5\\], the model has only 2"):
        anonymous.check_model(_tiny_model())
    wide = Predictors({0: (torch.zeros(1, H), torch.zeros(N + 1, 1), torch.zeros(N + 1))},
                      TopK(keep=3), policy=Policy("top_k", 3))
    with pytest.raises(PredictorModelMismatch, match="intermediate_size 33 != 32"):
        wide.check_model(_tiny_model())


def test_corrupted_and_missing_files(tmp_path, trained):
    with pytest.raises(FileNotFoundError, match="no predictors directory"):
        Predictors.load(tmp_path / "nothing")
    path = trained.save(tmp_path / "preds")
    weights = path / "predictors.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-5] ^= 0xFF
    weights.write_bytes(bytes(blob))
    with pytest.raises(PredictorFileError, match="checksum"):
        Predictors.load(path)
    weights.unlink()
    with pytest.raises(PredictorFileError, match="missing its weights"):
        Predictors.load(path)
    path = trained.save(tmp_path / "preds2")
    config = path / "predictors.json"
    config.write_text(config.read_text()[:100])
    with pytest.raises(PredictorFileError, match="not valid JSON"):
        Predictors.load(path)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a sparselab predictors"):
        trained.save(other)
    assert (other / "notes.txt").read_text() == "mine"
    path = trained.save(tmp_path / "preds3")
    (path / "notes.txt").write_text("mine too")  # a user's file beside the predictors
    with pytest.raises(FileExistsError, match=r"holds other files too \(notes.txt\)"):
        trained.save(path)
    assert (path / "notes.txt").read_text() == "mine too" and Predictors.load(path).layers


def test_load_refuses_non_finite_values_and_a_non_boolean_lookahead(tmp_path, trained):
    import json

    from safetensors.torch import load_file, save_file

    from sparselab.prediction.files import sha256_of

    path = trained.save(tmp_path / "preds")
    weights, config_path = path / "predictors.safetensors", path / "predictors.json"
    tensors = load_file(str(weights))
    name = next(k for k in tensors if k.endswith("quantiles.all"))
    tensors[name][0] = float("nan")  # written consistently: the checksum matches the NaN
    save_file(tensors, str(weights), metadata={"format": "sparselab.predictors"})
    config = json.loads(config_path.read_text())
    config["sha256"]["predictors.safetensors"] = sha256_of(weights)
    config_path.write_text(json.dumps(config))
    with pytest.raises(PredictorFileError, match=f"NaN or infinite values in {name}"):
        Predictors.load(path)
    path = trained.save(tmp_path / "preds2")
    config_path = path / "predictors.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps(dict(config, lookahead="no")))
    with pytest.raises(PredictorFileError, match="lookahead must be true or false, got 'no'"):
        Predictors.load(path)
    assert Predictors.load(trained.save(tmp_path / "preds3")).lookahead is False


def test_evaluate_refuses_another_models_trace(trained):
    wrong = synthetic_trace(n_seq=2)
    wrong.meta["model"] = dict(wrong.meta["model"], model_type="qwen2")
    with pytest.raises(PredictorModelMismatch, match="model_type"):
        trained.evaluate(wrong)


# -- the real model ---------------------------------------------------------------------------


@pytest.mark.slow
def test_real_model_predictors_beat_the_density_baseline(small_trace):
    train, test = split_sequences(small_trace, held_out=0.25, seed=0)
    p = train_predictors(train, rank=64, layers=[0, 29], epochs=8, progress=False)
    df = p.evaluate(test)
    # a random mask of density d has recall d and keeps a share d of the mass
    assert (df.recall > df.predicted_density + 0.1).all(), df
    assert (df.mass_kept > df.predicted_density + 0.15).all(), df
    assert df.predicted_density.between(0.4, 0.6).all(), df
    assert p.model["name"] == small_trace.meta["model"]["name"]
