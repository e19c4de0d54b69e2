"""The embedded real model end to end (SmolLM2-135M-Instruct, offline): loading, recording,
recomputation from the real weights, calibration, and the depth trend of |h|.

Uses the session fixtures ``real_model`` and ``small_trace`` (8 passages x 64 tokens) of
tests/conftest.py.

    pytest -q -m slow tests/test_real_model.py
"""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch

import sparselab as sl

pytestmark = pytest.mark.slow

N_LAYERS, HIDDEN, NEURONS = 30, 576, 1536
CHECK_LAYERS = (0, 14, 29)


def test_load_model_works_offline(monkeypatch):
    # no network at all: any connection attempt fails the test
    def no_network(*args, **kwargs):
        raise AssertionError("load_model() tried to reach the network")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    model, tokenizer = sl.load_model()
    assert model.config.sparselab_name == "SmolLM2-135M-Instruct"
    assert not model.training and next(model.parameters()).dtype == torch.float32
    assert tokenizer.pad_token is not None
    adapter = sl.models.adapter_for(model)
    assert (adapter.model_type, adapter.activation, adapter.n_layers, adapter.n_neurons) == (
        "llama", "silu", N_LAYERS, NEURONS,
    )
    ids = tokenizer("The quick brown fox", return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits
    assert torch.isfinite(logits).all()
    del model


def test_small_trace_end_to_end(small_trace):
    trace = small_trace
    assert (trace.n_layers, trace.n_neurons, trace.hidden_size) == (N_LAYERS, NEURONS, HIDDEN)
    assert trace.n_sequences == 8 and trace.n_tokens <= 8 * 64
    assert trace.arrays["h"].dtype == torch.float16
    assert trace.is_prefill.all() and (trace.steps == 0).all()
    for seq in range(8):
        pos = trace.positions[trace.seq_ids == seq]
        assert pos.tolist() == list(range(len(pos)))
    assert trace.meta["model"]["name"] == "SmolLM2-135M-Instruct"
    assert trace.meta["activation"] == "silu"
    # the text pieces spell out the start of the first passage
    first = "".join(p for p, s in zip(trace.pieces, trace.seq_ids, strict=True) if s == 0)
    assert first.strip()[:40] == sl.load_corpus(n=1)[0].strip()[:40]
    for layer in CHECK_LAYERS:
        assert torch.isfinite(trace.activations(layer)).all()


def test_recorded_h_matches_real_weights(real_model, small_trace):
    model, _ = real_model
    for layer in CHECK_LAYERS:
        mlp = model.model.layers[layer].mlp
        x = small_trace.mlp_inputs(layer)  # stored in fp32
        with torch.no_grad():
            gate = torch.nn.functional.silu(x @ mlp.gate_proj.weight.T)
            h = gate * (x @ mlp.up_proj.weight.T)
        # h and gate are stored in fp16: relative error up to 2**-11
        torch.testing.assert_close(small_trace.activations(layer), h, rtol=2e-3, atol=1e-4)
        torch.testing.assert_close(small_trace.gate_activations(layer), gate, rtol=2e-3, atol=1e-4)


def test_recorded_inputs_match_the_residual_stream(real_model, small_trace):
    """For the first passage: layer_in = input_layernorm(hidden_states[l]) and
    mlp_in = post_attention_layernorm(hidden_states[l + 1] - down(h))."""
    model, tokenizer = real_model
    text = sl.load_corpus(n=1)[0]
    # the first 32 tokens suffice: attention is causal, so they match the 64-token run
    inputs = tokenizer([text], return_tensors="pt", truncation=True, max_length=32)
    seq = small_trace.select_sequences([0]).select_tokens(np.arange(32))
    assert seq.token_ids.tolist() == inputs["input_ids"][0].tolist()
    with torch.no_grad():
        hidden = model(**inputs, output_hidden_states=True, use_cache=False).hidden_states
        for layer in (0, 14, 28):  # hidden_states[30] is after the final norm
            dec = model.model.layers[layer]
            layer_in = dec.input_layernorm(hidden[layer][0])
            torch.testing.assert_close(seq.layer_inputs(layer), layer_in, rtol=1e-4, atol=1e-4)
            residual = hidden[layer + 1][0] - dec.mlp.down_proj(seq.activations(layer))
            mlp_in = dec.post_attention_layernorm(residual)
            # h went through fp16 storage before down(): compare loosely, but far tighter
            # than the distance to the wrong candidates (pre-norm input, layer input)
            err = (seq.mlp_inputs(layer) - mlp_in).abs().max()
            wrong = (seq.mlp_inputs(layer) - layer_in).abs().max()
            assert err < 0.05 * wrong and err < 0.05 * seq.mlp_inputs(layer).abs().max()


def test_calibrated_density_within_one_percent_per_layer(small_trace):
    rule = sl.rules.Calibrated(density=0.5).fit(small_trace)
    per_layer = small_trace.masks(rule).density().mean(axis=1)
    assert per_layer.shape == (N_LAYERS,)
    assert np.abs(per_layer - 0.5).max() < 0.01, per_layer
    # one layer against an independent numpy order statistic
    mags = np.sort(np.abs(small_trace.activations(29).numpy()).ravel())
    drop = int(round(0.5 * mags.size))
    assert rule.thresholds[29] == pytest.approx(float(mags[drop - 1]))


def test_median_magnitude_grows_with_depth(small_trace):
    medians = np.array(
        [float(small_trace.activations(layer).abs().median()) for layer in small_trace.layers]
    )
    early, late = np.median(medians[:5]), np.median(medians[-5:])
    assert late > 3 * early, medians
    assert medians[-1] > medians[0]


def test_generate_on_the_real_model(real_model):
    model, tokenizer = real_model
    inputs = tokenizer(["def add(a, b):"], return_tensors="pt")
    n_prompt = inputs["input_ids"].shape[1]
    with torch.no_grad(), sl.Recorder(model, layers=[0, 29], store=("h",), tokenizer=tokenizer) as rec:
        out = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    trace = rec.trace
    assert trace.n_tokens == n_prompt + 3
    assert trace.token_ids.tolist() == out[0, : n_prompt + 3].tolist()
    assert trace.is_prefill.tolist() == [True] * n_prompt + [False] * 3
    assert trace.steps.tolist() == [0] * n_prompt + [1, 2, 3]
    assert trace.pieces == tokenizer.batch_decode([[int(t)] for t in trace.token_ids])
