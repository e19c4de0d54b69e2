"""The second embedded model, Gemma-3-270M (GELU-tanh, 18 layers), offline: loading from its
GGUF chunk packages, structure, recording against its own weights, sparse and restored.

    pytest -q -m slow tests/test_gemma.py
"""

from __future__ import annotations

import socket

import pytest
import torch

import sparselab as sl

pytestmark = pytest.mark.slow


def test_loads_offline_with_its_shape(gemma_model, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("load_model() tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    model, tokenizer = gemma_model
    assert model.config.sparselab_name == "gemma3-270m"
    adapter = sl.models.adapter_for(model)
    assert (adapter.model_type, adapter.activation, adapter.n_layers, adapter.n_neurons) == (
        "gemma3_text", "gelu_tanh", 18, 2048)
    assert adapter.hidden_size == 640
    # an alias loads the same cached copy (no second conversion)
    assert sl.models.embedded_model_dir("gemma3") == sl.models.embedded_model_dir("gemma3-270m")
    ids = tokenizer("def fibonacci(n):", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "return" in tokenizer.decode(out[0, ids["input_ids"].shape[1]:])  # it writes code


def test_recorded_h_matches_its_weights_and_sparse_runs_restore(gemma_model):
    model, tokenizer = gemma_model
    trace = sl.record(model, tokenizer, sl.load_corpus(n=2), max_length=32, progress=False,
                      store=("h", "mlp_in"), dtype=torch.float32)
    for layer in (0, 17):
        mlp = model.model.layers[layer].mlp
        x = trace.mlp_inputs(layer)
        with torch.no_grad():
            h = torch.nn.functional.gelu(x @ mlp.gate_proj.weight.T, approximate="tanh") * (
                x @ mlp.up_proj.weight.T)
        torch.testing.assert_close(trace.activations(layer), h, rtol=1e-4, atol=1e-5)
    ids = tokenizer(sl.load_corpus(n=1)[0], return_tensors="pt", truncation=True, max_length=24)
    with torch.no_grad():
        dense = model(**ids).logits
        with sl.sparsify(model, mode="oracle", density=1.0, prefill="per_token"):
            full = model(**ids).logits
        with sl.sparsify(model, mode="oracle", density=0.5, prefill="per_token"):
            half = model(**ids).logits
        restored = model(**ids).logits
    assert torch.equal(full, dense) and torch.equal(restored, dense)
    assert not torch.allclose(half, dense)
