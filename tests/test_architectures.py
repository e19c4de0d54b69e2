"""Every tested architecture on a tiny randomly initialised config (no download).

For each: the adapter finds all decoder layers and the right activation by structure,
recording works, what was recorded agrees with a recomputation from the layer's own
weights and with the model's residual stream (``output_hidden_states``), and the model
runs sparsely (oracle masks per token) exactly like an independent hook-based sparse
model, then is restored bit for bit.

    pytest -q tests/test_architectures.py
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers as tf

import sparselab as sl
from sparselab.models import UnsupportedModelError, adapter_for, model_identity

HIDDEN, NEURONS, N_LAYERS, VOCAB = 32, 48, 3, 100
COMMON = dict(
    hidden_size=HIDDEN,
    intermediate_size=NEURONS,
    num_hidden_layers=N_LAYERS,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=VOCAB,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

# name -> (config class, model class, extra config args, model_type, activation, fused)
ARCHS = {
    "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, {}, "llama", "silu", False),
    "mistral": (tf.MistralConfig, tf.MistralForCausalLM, {}, "mistral", "silu", False),
    "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, {}, "qwen2", "silu", False),
    "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, {"head_dim": 8}, "qwen3", "silu", False),
    "gemma": (tf.GemmaConfig, tf.GemmaForCausalLM, {"head_dim": 8}, "gemma", "gelu_tanh", False),
    "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM, {"head_dim": 8}, "gemma2", "gelu_tanh", False),
    "gemma3": (
        tf.Gemma3TextConfig, tf.Gemma3ForCausalLM, {"head_dim": 8}, "gemma3_text", "gelu_tanh", False,
    ),
    "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM, {}, "phi3", "silu", True),
    # no list of model types is consulted: these are found by structure alone
    "olmo": (tf.OlmoConfig, tf.OlmoForCausalLM, {}, "olmo", "silu", False),
    "olmo2": (tf.Olmo2Config, tf.Olmo2ForCausalLM, {}, "olmo2", "silu", False),
    "granite": (tf.GraniteConfig, tf.GraniteForCausalLM, {}, "granite", "silu", False),
    "cohere": (tf.CohereConfig, tf.CohereForCausalLM, {}, "cohere", "silu", False),
    "stablelm": (tf.StableLmConfig, tf.StableLmForCausalLM, {}, "stablelm", "silu", False),
    "helium": (tf.HeliumConfig, tf.HeliumForCausalLM, {"head_dim": 8}, "helium", "silu", False),
    "glm": (tf.GlmConfig, tf.GlmForCausalLM, {"head_dim": 8}, "glm", "silu", True),
    "exaone4": (tf.Exaone4Config, tf.Exaone4ForCausalLM, {"head_dim": 8}, "exaone4", "silu", False),
}
# how the MLP sits in the residual stream, where it is not "x + mlp(pre_norm(x))"
POST_NORM_ONLY = {"olmo2", "exaone4"}  # mlp(x) with no norm before it, a norm after
PARALLEL = {"cohere"}  # attention and MLP both read input_layernorm(x)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_model(arch: str, seed: int = 0, **overrides):
    config_cls, model_cls, extra, *_ = ARCHS[arch]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**{**COMMON, **extra, **overrides}))
    return model.eval()


def batch(lengths=(7, 4), seed: int = 1) -> dict[str, torch.Tensor]:
    """Right-padded batch of random token ids (no tokenizer needed)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.randint(3, VOCAB, (n,), generator=g)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask}


def own_act(mlp: torch.nn.Module):
    """The activation module the model itself calls (Phi-3 names it differently)."""
    return mlp.activation_fn if hasattr(mlp, "activation_fn") else mlp.act_fn


def own_gate_up(mlp: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Gate and up weights read straight from the module (Phi-3: split the fused matrix,
    gate first, as Phi3MLP.forward chunks it)."""
    if hasattr(mlp, "gate_up_proj"):
        gate, up = mlp.gate_up_proj.weight.chunk(2, dim=0)
        return gate, up
    return mlp.gate_proj.weight, mlp.up_proj.weight


def mlp_norms(layer: torch.nn.Module, arch: str):
    """(norm before the MLP, map applied to the MLP output before the residual add)."""
    post = getattr(layer, "post_feedforward_layernorm", None) or (lambda t: t)
    if arch in POST_NORM_ONLY:
        return (lambda t: t), post
    pre = getattr(layer, "pre_feedforward_layernorm", None) or layer.post_attention_layernorm
    return pre, post


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_adapter_finds_layers_and_activation(arch):
    _, _, _, model_type, activation, fused = ARCHS[arch]
    model = tiny_model(arch)
    adapter = adapter_for(model)
    assert adapter.model_type == model_type
    assert adapter.activation == activation
    assert adapter.n_layers == N_LAYERS and adapter.n_neurons == NEURONS
    decoder_layers = model.model.layers
    x = torch.linspace(-5, 5, 201)
    for i, lm in enumerate(adapter.layers):
        assert lm.index == i and lm.layer is decoder_layers[i] and lm.mlp is decoder_layers[i].mlp
        assert lm.input_norm is getattr(decoder_layers[i], "input_layernorm", None)
        assert lm.fused_gate_up is fused and lm.n_neurons == NEURONS
        # the adapter's activation is the function the model's MLP really applies
        torch.testing.assert_close(adapter.act_fn(x), own_act(lm.mlp)(x), rtol=0, atol=1e-6)
        gate_w, up_w = lm.gate_up_weights()
        ref_gate, ref_up = own_gate_up(lm.mlp)
        assert gate_w.shape == up_w.shape == (NEURONS, HIDDEN)
        assert torch.equal(gate_w, ref_gate) and torch.equal(up_w, ref_up)
        assert lm.down_proj is lm.mlp.down_proj
    identity = model_identity(model)
    assert identity["model_type"] == model_type
    assert (identity["hidden_size"], identity["intermediate_size"], identity["num_hidden_layers"]) == (
        HIDDEN, NEURONS, N_LAYERS,
    )


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_recorded_h_matches_recomputation_from_weights(arch):
    model = tiny_model(arch)
    inputs = batch()
    with torch.no_grad():
        with sl.Recorder(model, dtype=torch.float32) as rec:
            model(**inputs, use_cache=False)
        hidden = model(**inputs, use_cache=False, output_hidden_states=True).hidden_states
    trace = rec.trace
    valid = inputs["attention_mask"].bool()
    assert trace.n_tokens == int(valid.sum()) and trace.layers == tuple(range(N_LAYERS))
    assert trace.meta["activation"] == ARCHS[arch][4]
    assert trace.token_ids.tolist() == inputs["input_ids"][valid].tolist()
    for i, layer in enumerate(model.model.layers):
        x = trace.mlp_inputs(i)
        gate_w, up_w = own_gate_up(layer.mlp)
        act = own_act(layer.mlp)
        with torch.no_grad():
            ref_gate = act(x @ gate_w.T)
            ref_h = ref_gate * (x @ up_w.T)
            # the decoder layer's input norm, applied to the residual stream entering it
            # (models without one record the residual stream itself)
            norm = getattr(layer, "input_layernorm", None)
            ref_layer_in = hidden[i][valid] if norm is None else norm(hidden[i][valid])
        torch.testing.assert_close(trace.activations(i), ref_h, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(trace.gate_activations(i), ref_gate, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(trace.layer_inputs(i), ref_layer_in, rtol=1e-5, atol=1e-5)
        if i + 1 < N_LAYERS and arch not in PARALLEL:  # the last is after the final norm
            # residual stream after the MLP = residual before it + (post-norm of) down(h);
            # so the pre-MLP norm of (next layer's input - MLP output) is the MLP input
            pre, post = mlp_norms(layer, arch)
            with torch.no_grad():
                mlp_out = post(layer.mlp.down_proj(trace.activations(i)))
                residual = hidden[i + 1][valid] - mlp_out
                torch.testing.assert_close(pre(residual), x, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_generate_records_every_step_once(arch):
    model = tiny_model(arch)
    inputs = batch(lengths=(5, 5))
    new = 3
    with torch.no_grad(), sl.Recorder(model, store=("h",)) as rec:
        model.generate(
            **inputs, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0,
        )
    trace = rec.trace
    assert trace.n_tokens == 2 * (5 + new - 1)
    assert trace.is_prefill.sum() == 10 and sorted(set(trace.steps.tolist())) == [0, 1, 2]
    for seq in (0, 1):
        sel = trace.seq_ids == seq
        assert trace.positions[sel].tolist() == list(range(5 + new - 1))


def test_phi3_fused_split_is_gate_first():
    # make gate and up halves distinguishable: the recorded gate must come from the first
    model = tiny_model("phi3")
    mlp = model.model.layers[0].mlp
    with torch.no_grad():
        mlp.gate_up_proj.weight[NEURONS:] *= 100.0
    with torch.no_grad(), sl.Recorder(model, layers=[0], store=("gate", "mlp_in"), dtype=torch.float32) as rec:
        model(**batch(), use_cache=False)
    x = rec.trace.mlp_inputs(0)
    ref = torch.nn.functional.silu(x @ mlp.gate_up_proj.weight[:NEURONS].T)
    torch.testing.assert_close(rec.trace.gate_activations(0), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("hidden_act, expected", [("silu", "silu"), ("relu", "relu"), ("gelu", "gelu_tanh")])
def test_gemma_activation_follows_the_module(hidden_act, expected):
    # Gemma's config rewrites the legacy "gelu" to the tanh form; other values are used as is
    adapter = adapter_for(tiny_model("gemma", hidden_act=hidden_act))
    assert adapter.activation == expected
    mlp = adapter.layers[0].mlp
    x = torch.linspace(-4, 4, 101)
    torch.testing.assert_close(adapter.act_fn(x), mlp.act_fn(x), rtol=0, atol=1e-6)


def test_unsupported_activation_is_named():
    with pytest.raises(UnsupportedModelError, match="ReLUSquaredActivation.*relu2.*silu, gelu_tanh"):
        adapter_for(tiny_model("llama", hidden_act="relu2"))


def test_unsupported_model_names_class_and_supported_list():
    model = tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64))
    with pytest.raises(UnsupportedModelError) as info:
        adapter_for(model)
    message = str(info.value)
    assert "GPT2LMHeadModel" in message and "gpt2" in message
    for name in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3"):
        assert name in message
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel"):
        sl.Recorder(model)


def masked_by_hooks(model, keep: float):
    """An independent sparse model: pre-hooks on every down projection keep each token's
    ``keep`` share of largest |h| (plain torch, none of sparselab's runtime)."""
    hooks = []
    for layer in model.model.layers:
        def zero_small(module, args):
            h = args[0]
            k = int(round(keep * h.shape[-1]))
            mask = torch.zeros_like(h, dtype=torch.bool).scatter_(-1, h.abs().topk(k, dim=-1).indices, True)
            return (h * mask,)

        hooks.append(layer.mlp.down_proj.register_forward_pre_hook(zero_small))
    return hooks


def test_at_least_twelve_architectures_are_tested():
    assert len(ARCHS) >= 12
    assert {"olmo2", "granite", "cohere"} <= set(ARCHS)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_sparsify_oracle_per_token_matches_hooks_and_restores_bit_exactly(arch):
    model = tiny_model(arch)
    inputs = batch(lengths=(6, 6))
    with torch.no_grad():
        dense = model(**inputs, use_cache=False).logits
        with sl.sparsify(model, mode="oracle", rule=sl.rules.TopK(0.5), prefill="per_token") as handle:
            sparse = model(**inputs, use_cache=False).logits
        assert not sl.runtime.is_sparsified(model) and not handle.active
        restored = model(**inputs, use_cache=False).logits
        hooks = masked_by_hooks(model, 0.5)
        try:
            reference = model(**inputs, use_cache=False).logits
        finally:
            for h in hooks:
                h.remove()
    assert torch.equal(restored, dense)  # bit for bit
    assert not torch.allclose(sparse, dense, atol=1e-6)  # the masks did something
    torch.testing.assert_close(sparse, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_static_decode_runs_the_fast_kernels_and_restores(arch):
    """The compiled kernels (down transposed in place) on every layout, then restored."""
    model = tiny_model(arch)
    ids = batch(lengths=(5,))["input_ids"]
    static = {i: np.arange(0, NEURONS, 2) for i in range(N_LAYERS)}
    keep = torch.zeros(NEURONS, dtype=torch.bool)
    keep[::2] = True
    with torch.no_grad():
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with sl.sparsify(model, mode="static", static_neurons=static, prefill="union"):
            sparse = model(input_ids=ids, use_cache=False).logits
        hooks = [layer.mlp.down_proj.register_forward_pre_hook(lambda m, a: (a[0] * keep,))
                 for layer in model.model.layers]
        try:
            reference = model(input_ids=ids, use_cache=False).logits
        finally:
            for h in hooks:
                h.remove()
    torch.testing.assert_close(sparse, reference, rtol=1e-4, atol=1e-5)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) and after[k].is_contiguous() for k in before)


def test_a_gated_mlp_with_an_extra_step_is_refused():
    # BitNet normalises h inside its MLP (down(norm(act(gate) * up))): same projections,
    # another function. Sparsifying it as a plain gated MLP would be wrong.
    model = tf.BitNetForCausalLM(tf.BitNetConfig(**COMMON, hidden_act="silu")).eval()
    with pytest.raises(UnsupportedModelError, match="does not compute down.*ffn_sub_norm"):
        adapter_for(model)


def test_mixture_of_experts_is_refused_with_what_is_missing():
    model = tf.MixtralForCausalLM(tf.MixtralConfig(**COMMON, num_local_experts=2)).eval()
    with pytest.raises(UnsupportedModelError, match="no decoder layer holds a gated MLP"):
        adapter_for(model)
