"""MLP weight fingerprints (sparselab.models.fingerprint) and the check in Predictors.load.

The same weights (built twice, in bfloat16, quantized to int8 while sparsified) must match;
other weights of the same shapes (another seed, noise on one matrix, a rescaling) must not,
and the error names the layer and matrix.

    pytest -q tests/test_fingerprint.py
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import sparselab as sl
from sparselab.models.fingerprint import (
    check_fingerprint,
    fingerprint_diffs,
    mlp_fingerprint,
    weight_fingerprint,
)
from sparselab.prediction import PredictorModelMismatch, Predictors
from sparselab.prediction.files import PredictorFileError
from sparselab.testing.tiny import tiny_llama, word_tokenizer

HIDDEN, NEURONS, LAYERS, VOCAB = 64, 200, 3, 100
TEXTS = ["w10 w11 w12 w13 w14 w15", "w40 w41 w42", "w50 w51 w52 w53 w54", "w60 w61"] * 4

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_model(seed: int = 0):
    return tiny_llama(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=NEURONS,
                      num_layers=LAYERS, seed=seed, max_position_embeddings=64, pad_token_id=0,
                      eos_token_id=2)


@pytest.fixture(scope="module")
def model():
    return make_model()


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
    """Predictors trained on a recording of ``model``, saved: the path."""
    trace = sl.record(model, word_tokenizer(VOCAB), TEXTS, progress=False)
    assert trace.meta["mlp_fingerprint"] == mlp_fingerprint(model)
    predictors = sl.train_predictors(trace, rule=sl.rules.Calibrated(density=0.4), rank=4,
                                     progress=False)
    assert predictors.model["mlp_fingerprint"] == trace.meta["mlp_fingerprint"]
    return predictors.save(tmp_path_factory.mktemp("fp") / "preds")


def perturbed(layer: int, role: str, scale: float = 0.5, seed: int = 1):
    """A copy of the model with Gaussian noise of ``scale`` x the RMS on one matrix."""
    other = make_model()
    w = getattr(other.model.layers[layer].mlp, f"{role}_proj").weight
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w += scale * w.square().mean().sqrt() * torch.randn(w.shape, generator=g)
    return other


# ---------------------------------------------------------------------------- fingerprints


def test_same_weights_give_the_same_fingerprint(model):
    fp = mlp_fingerprint(model)
    assert fp == mlp_fingerprint(make_model())  # built (loaded) twice: identical numbers
    assert json.loads(json.dumps(fp)) == fp
    assert sorted(fp["layers"], key=int) == [str(i) for i in range(LAYERS)]
    assert fingerprint_diffs(fp, fp) == ""
    assert weight_fingerprint(model) == weight_fingerprint(make_model())


def test_bfloat16_and_int8_copies_match(model):
    fp = mlp_fingerprint(model)
    assert fingerprint_diffs(fp, mlp_fingerprint(make_model().to(torch.bfloat16))) == ""
    for weights in ("int8", "int8_rows", "int8_rowcol"):
        other = make_model()
        with sl.sparsify(other, mode="static", static_neurons={i: np.arange(50) for i in range(LAYERS)},
                         weights=weights):
            quantized = mlp_fingerprint(other)  # the dequantized int8 values
        assert quantized != fp and fingerprint_diffs(fp, quantized) == "", weights
    # the exact digest, in contrast, tells them apart
    assert weight_fingerprint(model) != weight_fingerprint(make_model().to(torch.bfloat16))


@pytest.mark.parametrize("layer,role", [(0, "gate"), (1, "up"), (2, "down")])
def test_noise_on_one_matrix_is_named(model, layer, role):
    diffs = fingerprint_diffs(mlp_fingerprint(model), mlp_fingerprint(perturbed(layer, role)))
    assert diffs.startswith(f"layer {layer} {role} (distance ")
    assert diffs.count("layer") == 1


def test_other_seed_and_rescaled_weights_differ(model):
    diffs = fingerprint_diffs(mlp_fingerprint(model), mlp_fingerprint(make_model(seed=7)))
    assert diffs.count("layer") == 3 * LAYERS
    scaled = make_model()
    with torch.no_grad():
        scaled.model.layers[1].mlp.down_proj.weight.mul_(1.5)
    diffs = fingerprint_diffs(mlp_fingerprint(model), mlp_fingerprint(scaled))
    assert diffs.startswith("layer 1 down (distance ") and diffs.count("layer") == 1


def test_layers_whose_weights_are_on_disk_are_left_out(tmp_path):
    from sparselab.runtime.weight_file import write_mlp_file

    other = make_model()
    path = write_mlp_file(other, tmp_path / "mlp.bin", layers=[1])
    with sl.sparsify(other, mode="static", static_neurons={1: np.arange(50)}, weight_file=path):
        fp = mlp_fingerprint(other)
    assert sorted(fp["layers"]) == ["0", "2"]
    assert fingerprint_diffs(mlp_fingerprint(make_model()), fp) == ""


@pytest.mark.parametrize("edit,message", [
    (lambda fp: fp.pop("layers"), "an object with"),
    (lambda fp: fp.update(version=99), "version 99"),
    (lambda fp: fp["layers"].update(x=fp["layers"]["0"]), "layer 'x'"),
    (lambda fp: fp["layers"]["0"].pop("up"), "layer '0' must map"),
    (lambda fp: fp["layers"]["0"]["up"].pop(), "9 finite numbers"),
    (lambda fp: fp["layers"]["0"]["up"].__setitem__(1, float("nan")), "9 finite numbers"),
    (lambda fp: fp["layers"]["0"]["up"].__setitem__(1, "1.0"), "9 finite numbers"),
])
def test_malformed_fingerprints_are_refused(model, edit, message):
    fp = json.loads(json.dumps(mlp_fingerprint(model)))
    edit(fp)
    with pytest.raises(ValueError, match=message):
        check_fingerprint(fp)


# ------------------------------------------------------------------ Predictors.load(model=)


def test_load_passes_the_same_model_and_its_bf16_copy(saved, model):
    Predictors.load(saved, model=model)
    Predictors.load(saved, model=make_model())
    Predictors.load(saved, model=make_model().to(torch.bfloat16))
    with sl.sparsify(make_model(), weights="int8", mode="static",
                     static_neurons={i: np.arange(50) for i in range(LAYERS)}) as handle:
        Predictors.load(saved, model=handle.model)


def test_load_refuses_other_weights_of_the_same_shapes(saved):
    with pytest.raises(PredictorModelMismatch, match=r"layer 1 up \(distance .*check_weights=False"):
        Predictors.load(saved, model=perturbed(1, "up"))
    with pytest.raises(PredictorModelMismatch, match="not those the predictors were trained on"):
        Predictors.load(saved, model=make_model(seed=3))
    # the explicit opt-out: sizes are still compared
    Predictors.load(saved, model=make_model(seed=3), check_weights=False)


def test_a_file_without_a_fingerprint_still_loads(saved, tmp_path):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(saved, old)
    config = json.loads((old / "predictors.json").read_text())
    del config["model"]["mlp_fingerprint"]  # as written before fingerprints existed
    (old / "predictors.json").write_text(json.dumps(config))
    loaded = Predictors.load(old, model=make_model(seed=3))  # shapes only: nothing to compare
    assert "mlp_fingerprint" not in loaded.model


def test_a_malformed_fingerprint_in_a_file_is_a_file_error(saved, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(saved, bad)
    config = json.loads((bad / "predictors.json").read_text())
    config["model"]["mlp_fingerprint"]["layers"]["0"]["gate"] = [1.0]
    (bad / "predictors.json").write_text(json.dumps(config))
    with pytest.raises(PredictorFileError, match="mlp_fingerprint is malformed"):
        Predictors.load(bad)
