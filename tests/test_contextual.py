"""sl.contextual and sl.evaluate(extra_modes=...): fixed neuron sets against hand-masked models."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import sparselab as sl
from sparselab.studies import contextual
from sparselab.testing.tiny import tiny_llama

H, N, LAYERS = 64, 160, 2
TEXTS = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "def add(a, b):\n    return a + b  # adds two numbers together",
    "Return the number of items in a container; raises TypeError otherwise.",
]


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_llama(vocab_size=len(tokenizer), hidden_size=H, intermediate_size=N,
                      num_layers=LAYERS, tie_word_embeddings=True,
                      initializer_range=0.15)  # large enough that the MLPs move the logits


def reference_quality(model, tokenizer, texts, sets=None):
    """(perplexity, KL to dense) with h masked to fixed ``sets`` by hooks on down_proj."""
    with torch.no_grad():
        encoded = [tokenizer(text, return_tensors="pt").input_ids for text in texts]
        dense = [torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1) for ids in encoded]
        handles = []
        for i, layer in enumerate(model.model.layers):
            if sets is None:
                break
            keep = torch.zeros(N)
            keep[torch.as_tensor(sets[i])] = 1.0
            handles.append(layer.mlp.down_proj.register_forward_pre_hook(
                lambda mod, args, keep=keep: (args[0] * keep,)))
        try:
            masked = [torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1) for ids in encoded]
        finally:
            for h in handles:
                h.remove()
    nll = -sum(float(lp.gather(1, ids[0, 1:, None]).sum()) for lp, ids in zip(masked, encoded, strict=True))
    kl = sum(float((d.exp() * (d - lp)).sum()) for d, lp in zip(dense, masked, strict=True))
    count = sum(ids.shape[1] - 1 for ids in encoded)
    return math.exp(nll / count), kl / count


def test_random_sets_shape_determinism_and_independence():
    a = contextual.random_sets([0, 1, 5], 100, 0.25, seed=3)
    assert all(len(v) == 25 and v.dtype == np.int64 for v in a.values())
    assert all((np.diff(v) > 0).all() and v.min() >= 0 and v.max() < 100 for v in a.values())
    assert not np.array_equal(a[0], a[1])  # layers draw their own sets
    # a layer's set does not depend on which other layers are asked for
    assert np.array_equal(contextual.random_sets([5], 100, 0.25, seed=3)[5], a[5])
    assert not np.array_equal(contextual.random_sets([5], 100, 0.25, seed=4)[5], a[5])
    assert len(contextual.random_sets([0], 100, 1.0)[0]) == 100
    with pytest.raises(ValueError, match="density"):
        contextual.random_sets([0], 100, 0.0)


def test_evaluate_extra_mode_matches_hand_masked_model(model, tokenizer):
    make = contextual.random_mode(range(LAYERS), N, seed=1)
    df = sl.evaluate(model, tokenizer, TEXTS, densities=(0.3,), modes=("dense",), n_generate=0,
                     progress=False, kernel="torch", extra_modes={"random": make})
    assert list(df["mode"]) == ["dense", "random"]
    assert df.attrs["config"]["extra_modes"] == ["random"]
    row = df[df["mode"] == "random"].iloc[0]
    ppl, kl = reference_quality(model, tokenizer, TEXTS, make(0.3)["static_neurons"])
    assert row.perplexity == pytest.approx(ppl, rel=1e-4)
    assert row.kl == pytest.approx(kl, rel=1e-3, abs=1e-6)
    dense_ppl, _ = reference_quality(model, tokenizer, TEXTS)
    assert df.iloc[0].perplexity == pytest.approx(dense_ppl, rel=1e-4)
    assert row.kl > 0  # the mask changes the model


def test_evaluate_extra_modes_are_checked_before_any_pass(model, tokenizer):
    with pytest.raises(ValueError, match="other than"):
        sl.evaluate(model, tokenizer, TEXTS, modes=("dense",), extra_modes={"oracle": lambda d: {}})
    with pytest.raises(ValueError, match="need mode="):
        sl.evaluate(model, tokenizer, TEXTS, modes=("dense",), extra_modes={"x": lambda d: {"rule": None}})
    with pytest.raises(ValueError, match="set by sl.evaluate"):
        sl.evaluate(model, tokenizer, TEXTS, modes=("dense",),
                    extra_modes={"x": lambda d: {"mode": "oracle", "density": d, "prefill": "dense"}})
    with pytest.raises(TypeError, match="must map a density"):
        sl.evaluate(model, tokenizer, TEXTS, modes=("dense",), extra_modes={"x": 3})


def test_contextual_vs_static_rows_and_full_density(model, tokenizer):
    trace = sl.record(model, tokenizer, TEXTS[:2], max_length=32, store=("h",), progress=False)
    df = contextual.contextual_vs_static(model, tokenizer, TEXTS[2:], trace, densities=(0.5, 1.0),
                                         progress=False, kernel="torch")
    assert set(df["mode"]) == {"dense", "oracle", "static", "random"}
    assert set(df["label"]) == set(contextual.LABELS.values())
    dense = df[df["mode"] == "dense"].perplexity.iloc[0]
    # every mode keeps every neuron at density 1: the dense model, whatever its sets
    full = df[df.density == 1.0]
    assert np.allclose(full.perplexity, dense, rtol=1e-5) and np.allclose(full.kl, 0.0, atol=1e-6)
    half = df[df.density == 0.5].set_index("mode")
    assert (half.kl > 0).all()
    # the static row really uses the most frequent top-50 % neurons of the training trace
    sets = sl.prediction.static_from_trace(trace, sl.rules.TopK(0.5), 0.5)
    ppl, _ = reference_quality(model, tokenizer, TEXTS[2:], [sets[i] for i in range(LAYERS)])
    assert half.loc["static", "perplexity"] == pytest.approx(ppl, rel=1e-4)


def test_mass_kept_by_mode_recomputed(model, tokenizer):
    train = sl.record(model, tokenizer, TEXTS[:2], max_length=32, store=("h",), progress=False)
    test = sl.record(model, tokenizer, TEXTS[2:], max_length=32, store=("h",), progress=False)
    df = contextual.mass_kept_by_mode(test, train, densities=(0.25,), seed=2)
    assert len(df) == LAYERS * 3
    static = sl.prediction.static_from_trace(train, sl.rules.TopK(0.25), 0.25)
    rand = contextual.random_sets(test.layers, N, 0.25, seed=2)
    for layer in test.layers:
        mags = test.activations(layer).abs().double().numpy()
        total = mags.sum(1)
        top = np.sort(mags, axis=1)[:, ::-1][:, :40].sum(1)
        expected = {"oracle": (top / total).mean(), "static": (mags[:, static[layer]].sum(1) / total).mean(),
                    "random": (mags[:, rand[layer]].sum(1) / total).mean()}
        got = df[df.layer == layer].set_index("mode").mass_kept
        for mode, value in expected.items():
            assert got[mode] == pytest.approx(value, rel=1e-9)
        # the per-token best set of a size keeps at least as much as any fixed set of that size
        assert got["oracle"] >= got["static"] and got["oracle"] >= got["random"]
