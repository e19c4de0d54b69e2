"""sl.residual: cosine of consecutive residual states against output_hidden_states."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

import sparselab as sl
from sparselab.studies import residual
from sparselab.testing.tiny import tiny_llama

H, N, LAYERS = 64, 96, 3
TEXTS = ["A short text.", "def f(x):\n    return x * 2  # a longer piece of code with more tokens",
         "Lists are mutable sequences, typically used to store collections of items."]


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_llama(vocab_size=len(tokenizer), hidden_size=H, intermediate_size=N,
                      num_layers=LAYERS, tie_word_embeddings=True,
                      initializer_range=0.1)


def test_residual_cosine_matches_hidden_states(model, tokenizer):
    # batch of 2 with padding: padded positions must be dropped, the rest unaffected
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        df = residual.residual_cosine(model, tokenizer, TEXTS, max_length=16, batch_size=2, progress=False)
        assert tokenizer.padding_side == "left"  # restored after the call
    finally:
        tokenizer.padding_side = side
    lengths = [min(16, len(tokenizer(t).input_ids)) for t in TEXTS]
    assert len(df) == LAYERS * sum(lengths)
    assert list(df.columns) == ["layer", "seq_id", "position", "cosine"]
    for seq, text in enumerate(TEXTS):
        ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=16).input_ids
        with torch.no_grad():
            hs = model(input_ids=ids, output_hidden_states=True).hidden_states
        # hidden_states[l] enters layer l; the last entry is after the final norm, so the
        # reference covers the layers before the last one
        for layer in range(LAYERS - 1):
            expected = F.cosine_similarity(hs[layer][0].double(), hs[layer + 1][0].double(), dim=-1).numpy()
            got = df[(df.layer == layer) & (df.seq_id == seq)].sort_values("position").cosine.to_numpy()
            np.testing.assert_allclose(got, expected, atol=1e-5)
    assert df.cosine.between(-1 - 1e-9, 1 + 1e-9).all()


def _hook_counts(model):
    return [len(layer._forward_hooks) + len(layer._forward_pre_hooks) for layer in model.model.layers]


def test_residual_cosine_layers_and_errors(model, tokenizer):
    before = _hook_counts(model)
    df = residual.residual_cosine(model, tokenizer, TEXTS[:1], layers=[2], progress=False)
    assert set(df.layer) == {2}
    assert _hook_counts(model) == before
    with pytest.raises(ValueError, match="layers must be in"):
        residual.residual_cosine(model, tokenizer, TEXTS, layers=[LAYERS], progress=False)
    with pytest.raises(ValueError, match="non-empty list"):
        residual.residual_cosine(model, tokenizer, "one string", progress=False)

    # an error inside the forward pass: every hook of ours is removed all the same
    def fail(module, args):
        raise RuntimeError("boom")

    handle = model.model.layers[1].register_forward_pre_hook(fail)
    try:
        with_fail = _hook_counts(model)
        with pytest.raises(RuntimeError, match="boom"):
            residual.residual_cosine(model, tokenizer, TEXTS, progress=False)
        assert _hook_counts(model) == with_fail
    finally:
        handle.remove()


def test_input_cosine_recomputed():
    g = torch.Generator().manual_seed(0)
    t = 30
    x = torch.randn(2, t, H, generator=g)
    y = x + 0.5 * torch.randn(2, t, H, generator=g)
    trace = sl.Trace(layers=(4, 9), arrays={"layer_in": x, "mlp_in": y}, token_ids=np.zeros(t, dtype=np.int64),
                     seq_ids=np.repeat([0, 1, 2], 10), positions=np.tile(np.arange(10), 3),
                     steps=np.zeros(t, dtype=np.int64), is_prefill=np.ones(t, dtype=bool))
    df = residual.input_cosine(trace)
    assert len(df) == 2 * t
    xs, ys = x[1].numpy(), y[1].numpy()
    expected = (xs * ys).sum(1) / np.linalg.norm(xs, axis=1) / np.linalg.norm(ys, axis=1)
    np.testing.assert_allclose(df[df.layer == 9].cosine.to_numpy(), expected, rtol=1e-6)
    no_inputs = sl.Trace(layers=(4, 9), arrays={"layer_in": x}, token_ids=trace.token_ids,
                         seq_ids=trace.seq_ids, positions=trace.positions, steps=trace.steps,
                         is_prefill=trace.is_prefill)
    with pytest.raises(KeyError, match="mlp_in"):
        residual.input_cosine(no_inputs)


def test_summarize_cosine_hand_example():
    df = pd.DataFrame({"layer": [0, 0, 0, 1, 1, 1], "position": [0, 1, 2, 0, 1, 2],
                       "cosine": [-1.0, 0.2, 0.4, 0.0, 0.9, 0.7]})
    out = residual.summarize_cosine(df).set_index("layer")
    assert out.loc[0, "mean"] == pytest.approx(0.3) and out.loc[1, "mean"] == pytest.approx(0.8)
    assert out.loc[0, "n_tokens"] == 2  # position 0 left out by default
    assert residual.summarize_cosine(df, min_position=0).set_index("layer").loc[0, "mean"] == pytest.approx(-0.4 / 3)
    with pytest.raises(ValueError, match="no tokens"):
        residual.summarize_cosine(df, min_position=5)


def test_tokenizer_without_pad_token_is_left_unchanged(model, tokenizer):
    pad = tokenizer.pad_token
    tokenizer.pad_token = None
    try:
        df = residual.residual_cosine(model, tokenizer, TEXTS[:2], batch_size=2, progress=False)
        assert tokenizer.pad_token is None
        lengths = [len(tokenizer(t).input_ids) for t in TEXTS[:2]]
        assert len(df) == LAYERS * sum(lengths)  # padded positions dropped
    finally:
        tokenizer.pad_token = pad
