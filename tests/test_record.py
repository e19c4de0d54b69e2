"""Recording (sparselab.record) on a tiny random Llama: values, padding, generate, hooks.

Every check compares with something computed without the recorder: the layer's weights,
the model's own residual stream (``output_hidden_states``) pushed through a hand-written
attention, or unpadded runs of each text alone.

    pytest -q tests/test_record.py
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import sparselab as sl
from sparselab.recording import Recorder, record
from sparselab.testing.tiny import WORD_TOKEN_IDS, tiny_llama, word_tokenizer

N_LAYERS, HIDDEN, NEURONS, VOCAB = 3, 32, 48, 100
TEXTS = [
    "w10 w11 w12 w13 w14 w15 w16 w17 w18",
    "w40 w41 w42",
    "w70 w71 w72 w73 w74 w75",
    "w90",
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():
    return tiny_llama(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=NEURONS,
                      num_layers=N_LAYERS, max_position_embeddings=64, **WORD_TOKEN_IDS)


@pytest.fixture(scope="module")
def tokenizer():
    """Word-level tokenizer built in memory: "wN" -> id N, [PAD]=0, [UNK]=1, [EOS]=2."""
    return word_tokenizer(VOCAB)


def ids_of(text: str) -> list[int]:
    return [int(w[1:]) for w in text.split()]


def encode(texts, side: str) -> dict[str, torch.Tensor]:
    """Pad by hand (independent of any tokenizer): ids and attention mask."""
    width = max(len(ids_of(t)) for t in texts)
    ids = torch.zeros(len(texts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, text in enumerate(texts):
        seq = torch.tensor(ids_of(text))
        cols = slice(0, len(seq)) if side == "right" else slice(width - len(seq), width)
        ids[row, cols], mask[row, cols] = seq, 1
    return {"input_ids": ids, "attention_mask": mask}


def all_hook_counts(module: torch.nn.Module) -> int:
    """Forward (pre-)hooks on every submodule; the with_kwargs dicts are flags for entries
    of these two, so they are checked to be cleaned up but not counted twice."""
    hooks = 0
    for m in module.modules():
        hooks += len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        assert set(m._forward_pre_hooks_with_kwargs) <= set(m._forward_pre_hooks)
        assert set(m._forward_hooks_with_kwargs) <= set(m._forward_hooks)
    return hooks


def run(model, inputs, **kwargs):
    kwargs.setdefault("dtype", torch.float32)
    with torch.no_grad(), Recorder(model, **kwargs) as rec:
        model(**inputs, use_cache=False)
    return rec.trace


# -- values -----------------------------------------------------------------------------


def manual_mlp_input(model, layer_idx: int, x: torch.Tensor) -> torch.Tensor:
    """post_attention_layernorm(x + attention(input_layernorm(x))) for one unpadded sequence
    ``x`` [1, S, H], with causal grouped-query attention written out by hand."""
    cfg = model.config
    layer = model.model.layers[layer_idx]
    attn = layer.self_attn
    n_heads, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = cfg.hidden_size // n_heads
    seq = x.shape[1]
    a = layer.input_layernorm(x)
    q = attn.q_proj(a).view(1, seq, n_heads, head_dim).transpose(1, 2)
    k = attn.k_proj(a).view(1, seq, n_kv, head_dim).transpose(1, 2)
    v = attn.v_proj(a).view(1, seq, n_kv, head_dim).transpose(1, 2)
    cos, sin = model.model.rotary_emb(x, torch.arange(seq)[None])
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    k = k.repeat_interleave(n_heads // n_kv, dim=1)
    v = v.repeat_interleave(n_heads // n_kv, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim)
    scores = scores.masked_fill(torch.ones(seq, seq, dtype=torch.bool).triu(1), float("-inf"))
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(1, seq, -1)
    return layer.post_attention_layernorm(x + attn.o_proj(out))


def test_h_equals_act_gate_times_up_from_weights(model):
    inputs = encode(TEXTS, "right")
    trace = run(model, inputs)
    assert trace.n_tokens == sum(len(ids_of(t)) for t in TEXTS)
    for i, layer in enumerate(model.model.layers):
        x = trace.mlp_inputs(i)
        mlp = layer.mlp
        with torch.no_grad():
            gate = torch.nn.functional.silu(x @ mlp.gate_proj.weight.T)
            h = gate * (x @ mlp.up_proj.weight.T)
        torch.testing.assert_close(trace.activations(i), h, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(trace.gate_activations(i), gate, rtol=1e-5, atol=1e-6)
        assert trace.activations(i).shape == (trace.n_tokens, NEURONS)
        assert trace.mlp_inputs(i).shape == (trace.n_tokens, HIDDEN)


def test_mlp_and_layer_inputs_match_independent_forward(model):
    text = TEXTS[0]
    inputs = encode([text], "right")
    trace = run(model, inputs)
    with torch.no_grad():
        hidden = model(**inputs, output_hidden_states=True, use_cache=False).hidden_states
        for i in range(N_LAYERS):
            x = hidden[i]  # residual stream entering layer i
            torch.testing.assert_close(trace.mlp_inputs(i), manual_mlp_input(model, i, x)[0], rtol=1e-4, atol=1e-5)
            layer_in = model.model.layers[i].input_layernorm(x)[0]
            torch.testing.assert_close(trace.layer_inputs(i), layer_in, rtol=1e-5, atol=1e-6)


def test_default_fp16_storage_is_close_to_fp32(model):
    inputs = encode(TEXTS, "right")
    exact = run(model, inputs)
    half = run(model, inputs, dtype=torch.float16)
    assert half.arrays["h"].dtype == torch.float16 and half.arrays["mlp_in"].dtype == torch.float32
    for i in range(N_LAYERS):
        torch.testing.assert_close(half.activations(i), exact.activations(i), rtol=2e-3, atol=1e-4)


# -- padding ----------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_records_exactly_the_unpadded_tokens(model, side):
    padded = run(model, encode(TEXTS, side))
    alone = [run(model, encode([t], "right")) for t in TEXTS]
    assert padded.n_tokens == sum(t.n_tokens for t in alone)
    for seq, single in enumerate(alone):
        part = padded.select_sequences([seq])
        assert part.token_ids.tolist() == ids_of(TEXTS[seq])  # no pad id 0 anywhere
        assert part.positions.tolist() == list(range(single.n_tokens))
        assert part.is_prefill.all() and (part.steps == 0).all()
        for i in range(N_LAYERS):
            torch.testing.assert_close(part.activations(i), single.activations(i), rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(part.mlp_inputs(i), single.mlp_inputs(i), rtol=1e-4, atol=1e-5)
    # tokens are ordered by sequence, then position
    order = np.lexsort((padded.positions, padded.seq_ids))
    np.testing.assert_array_equal(order, np.arange(padded.n_tokens))


def test_record_batches_and_truncation(model, tokenizer):
    trace = record(model, tokenizer, TEXTS, max_length=5, batch_size=3, dtype=torch.float32, progress=False)
    expected = [ids_of(t)[:5] for t in TEXTS]
    assert trace.token_ids.tolist() == [i for ids in expected for i in ids]
    assert trace.seq_ids.tolist() == [s for s, ids in enumerate(expected) for _ in ids]
    assert trace.pieces == [f"w{i}" for ids in expected for i in ids]
    assert trace.meta["record"] == {"max_length": 5, "batch_size": 3, "n_texts": 4}
    assert trace.meta["model"]["model_type"] == "llama" and trace.meta["activation"] == "silu"
    assert set(trace.meta["versions"]) >= {"torch", "transformers", "sparselab"}
    # each text alone gives the same h: batches and padding change nothing
    for seq, ids in enumerate(expected):
        single = run(model, {"input_ids": torch.tensor([ids])})
        for i in range(N_LAYERS):
            torch.testing.assert_close(
                trace.select_sequences([seq]).activations(i), single.activations(i), rtol=1e-4, atol=1e-5
            )
    frame = trace.to_frame()
    assert list(frame.columns) == ["token", "token_id", "piece", "seq_id", "position", "step", "is_prefill"]
    assert len(frame) == trace.n_tokens


def test_record_leaves_the_tokenizer_padding_side_alone(model, tokenizer):
    tokenizer.padding_side = "left"
    try:
        trace = record(model, tokenizer, TEXTS[:2], progress=False)
        assert tokenizer.padding_side == "left"
    finally:
        tokenizer.padding_side = "right"
    assert trace.token_ids.tolist() == ids_of(TEXTS[0]) + ids_of(TEXTS[1])


def test_positional_input_ids_without_mask(model):
    ids = torch.tensor([ids_of(TEXTS[0]), ids_of(TEXTS[0])])
    with torch.no_grad(), Recorder(model, store=("h",)) as rec:
        model(ids, use_cache=False)
    trace = rec.trace
    assert trace.n_tokens == ids.numel() and trace.seq_ids.tolist() == [0] * 9 + [1] * 9
    torch.testing.assert_close(trace.select_sequences([0]).activations(1), trace.select_sequences([1]).activations(1))


def test_record_input_errors(model, tokenizer):
    with pytest.raises(TypeError, match="list of strings"):
        record(model, tokenizer, "w3 w4", progress=False)
    with pytest.raises(ValueError, match="texts is empty"):
        record(model, tokenizer, [], progress=False)


@pytest.mark.parametrize("kwargs, message", [
    ({"texts": ["w3 w4", "  "]}, r"texts must be non-empty strings: texts\[1\]"),
    ({"max_length": 0}, "max_length must be >= 1, got 0"),
    ({"batch_size": 0}, "batch_size must be >= 1, got 0"),
    ({"batch_size": -1}, "batch_size must be >= 1, got -1"),
    ({"dtype": torch.int32}, "dtype must be torch.float16, torch.bfloat16 or torch.float32"),
    ({"layers": []}, "layers is empty"),
    ({"layers": [0, 7]}, r"layers must be distinct numbers in \[0, 3\)"),
    ({"store": []}, "store is empty"),
    ({"store": "gates"}, r"unknown arrays \['gates'\]"),
])
def test_record_bad_arguments_fail_before_any_work(model, tokenizer, kwargs, message):
    def hooks():
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())

    before, padding_side = hooks(), tokenizer.padding_side
    args = {"texts": TEXTS[:2], "progress": False, **kwargs}
    with pytest.raises(ValueError, match=message):
        record(model, tokenizer, args.pop("texts"), **args)
    assert hooks() == before and tokenizer.padding_side == padding_side


def test_record_takes_one_array_name_and_leaves_the_tokenizer_as_it_was(model, tokenizer):
    trace = record(model, tokenizer, TEXTS[:2], store="gate", progress=False)
    assert set(trace.arrays) == {"gate"}
    pad = tokenizer.pad_token
    tokenizer.pad_token = None  # a tokenizer without a pad token (as many causal LMs ship)
    try:
        trace = record(model, tokenizer, TEXTS[:2], store="h", progress=False)
        assert trace.n_tokens == 9 + 3 and tokenizer.pad_token is None
    finally:
        tokenizer.pad_token = pad


# -- generate with the KV cache ---------------------------------------------------------


@pytest.mark.parametrize("new_tokens", [1, 4])
def test_generate_records_each_forward_step_once(model, new_tokens):
    prompts = TEXTS[:3]
    inputs = encode(prompts, "left")  # generate wants left padding
    with torch.no_grad(), Recorder(model, dtype=torch.float32) as rec:
        out = model.generate(
            **inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
            pad_token_id=0, use_cache=True,
        )
    trace = rec.trace
    prompt_lens = [len(ids_of(t)) for t in prompts]
    assert trace.n_tokens == sum(prompt_lens) + len(prompts) * (new_tokens - 1)
    width = inputs["input_ids"].shape[1]
    for seq, n in enumerate(prompt_lens):
        part = trace.select_sequences([seq])
        # the prompt without its pads, then every generated token but the last (which no
        # forward pass consumes)
        generated = out[seq, width : width + new_tokens - 1].tolist()
        assert part.token_ids.tolist() == ids_of(prompts[seq]) + generated
        assert part.positions.tolist() == list(range(n + new_tokens - 1))
        assert part.is_prefill.tolist() == [True] * n + [False] * (new_tokens - 1)
        assert part.steps.tolist() == [0] * n + list(range(1, new_tokens))
    # each (sequence, position) recorded once
    assert len({(s, p) for s, p in zip(trace.seq_ids, trace.positions, strict=True)}) == trace.n_tokens

    # the decode steps recorded through the cache equal a plain forward over the full text
    full = out[:, : width + new_tokens - 1]
    mask = torch.cat([inputs["attention_mask"], torch.ones(len(prompts), new_tokens - 1, dtype=torch.long)], 1)
    plain = run(model, {"input_ids": full, "attention_mask": mask})
    np.testing.assert_array_equal(plain.token_ids, trace.token_ids)
    for i in range(N_LAYERS):
        torch.testing.assert_close(trace.activations(i), plain.activations(i), rtol=1e-4, atol=1e-5)


def test_two_generate_calls_get_new_sequence_ids(model):
    inputs = encode(TEXTS[:2], "left")
    with torch.no_grad(), Recorder(model, store=("h",)) as rec:
        for _ in range(2):
            model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0)
    trace = rec.trace
    assert sorted(set(trace.seq_ids.tolist())) == [0, 1, 2, 3]
    np.testing.assert_array_equal(
        trace.select_sequences([0]).token_ids, trace.select_sequences([2]).token_ids
    )


# -- hooks ------------------------------------------------------------------------------


def test_hooks_removed_after_normal_exit(model):
    before = all_hook_counts(model)
    with torch.no_grad(), Recorder(model) as rec:
        assert rec.active and all_hook_counts(model) > before
        model(**encode(TEXTS, "right"), use_cache=False)
    assert not rec.active and all_hook_counts(model) == before


def test_hooks_removed_after_exception_in_body(model):
    before = all_hook_counts(model)
    with pytest.raises(RuntimeError, match="boom"), torch.no_grad(), Recorder(model):
        model(**encode(TEXTS, "right"), use_cache=False)
        raise RuntimeError("boom")
    assert all_hook_counts(model) == before


def test_hooks_removed_after_exception_mid_forward(model):
    before = all_hook_counts(model)

    def explode(module, args):
        raise RuntimeError("inside layer 1")

    bomb = model.model.layers[1].mlp.register_forward_pre_hook(explode)
    try:
        with pytest.raises(RuntimeError, match="inside layer 1"), torch.no_grad(), Recorder(model):
            model(**encode(TEXTS, "right"), use_cache=False)
    finally:
        bomb.remove()
    assert all_hook_counts(model) == before
    # the half-finished call leaves nothing behind: a new recording is clean
    trace = run(model, encode(TEXTS[:1], "right"))
    assert trace.n_tokens == len(ids_of(TEXTS[0])) and trace.seq_ids.tolist() == [0] * trace.n_tokens


def test_recorder_cannot_be_entered_twice(model):
    rec = Recorder(model)
    with rec, pytest.raises(RuntimeError, match="already active"):
        rec.__enter__()
    assert not rec.active


def test_nothing_recorded_is_a_clear_error(model):
    with Recorder(model) as rec:
        pass
    with pytest.raises(RuntimeError, match="nothing was recorded"):
        _ = rec.trace


# -- layers and store -------------------------------------------------------------------


def test_layers_subset(model):
    inputs = encode(TEXTS, "right")
    full = run(model, inputs)
    before = all_hook_counts(model)
    with torch.no_grad(), Recorder(model, layers=[2, 0], dtype=torch.float32) as rec:
        assert all_hook_counts(model) - before == 2 + 2 * 4  # model pre/post + 4 per layer
        model(**inputs, use_cache=False)
    sub = rec.trace
    assert sub.layers == (2, 0) and sub.n_layers == 2
    assert all(arr.shape[0] == 2 for arr in sub.arrays.values())
    for layer in (0, 2):
        torch.testing.assert_close(sub.activations(layer), full.activations(layer))
        torch.testing.assert_close(sub.mlp_inputs(layer), full.mlp_inputs(layer))
    with pytest.raises(KeyError, match=r"layer 1 was not recorded \(layers: \[2, 0\]\)"):
        sub.activations(1)


def test_store_subset(model):
    inputs = encode(TEXTS, "right")
    full = run(model, inputs)
    sub = run(model, inputs, store=("h", "layer_in"))
    assert sorted(sub.arrays) == ["h", "layer_in"]
    for i in range(N_LAYERS):
        torch.testing.assert_close(sub.activations(i), full.activations(i))
        torch.testing.assert_close(sub.layer_inputs(i), full.layer_inputs(i))
    with pytest.raises(KeyError, match="'mlp_in' was not recorded"):
        sub.mlp_inputs(0)
    assert sub.n_neurons == NEURONS and sub.hidden_size == HIDDEN


@pytest.mark.parametrize("layers", [[3], [-1], [0, 0], [0, 7]])
def test_invalid_layers(model, layers):
    before = all_hook_counts(model)
    with pytest.raises(ValueError, match=r"layers must be distinct numbers in \[0, 3\)"):
        Recorder(model, layers=layers)
    assert all_hook_counts(model) == before


def test_unknown_store_name(model):
    with pytest.raises(ValueError, match="unknown arrays \\['attn'\\]"):
        Recorder(model, store=("h", "attn"))


def test_trace_masks_of_a_recording(model):
    trace = run(model, encode(TEXTS, "right"))
    masks = trace.masks(sl.rules.TopK(keep=12))
    assert (masks.counts() == 12).all()
    np.testing.assert_array_equal(masks.seq_ids, trace.seq_ids)


def test_take_trace_equals_trace_and_empties_the_recorder(model):
    # several forward calls give several chunks; take_trace must reassemble them exactly as
    # the non-releasing path does (same order, same values) and leave nothing behind
    calls = [encode(TEXTS[:2], "left"), encode(TEXTS[2:], "right"), encode(TEXTS[1:3], "left")]

    def run():
        with Recorder(model) as rec, torch.no_grad():
            for batch in calls:
                model(**batch)
        return rec

    kept, taken = run(), run()
    ref = kept.trace
    out = taken.take_trace()
    assert out.layers == ref.layers and sorted(out.arrays) == sorted(ref.arrays)
    for name in ref.arrays:
        assert torch.equal(out.arrays[name], ref.arrays[name]), name
    for field in ("token_ids", "seq_ids", "positions", "steps", "is_prefill"):
        np.testing.assert_array_equal(getattr(out, field), getattr(ref, field))
    with pytest.raises(RuntimeError, match="nothing was recorded"):
        _ = taken.trace
    with Recorder(model) as rec, torch.no_grad():
        model(**calls[0])
        with pytest.raises(RuntimeError, match="finished"):
            rec.take_trace()
