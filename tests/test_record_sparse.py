"""Recording a sparsified model (issue 11): what the sparse MLPs really computed.

Every check compares with something computed without the runtime: h from the layer's
weights in float64 on the recorded MLP input, the predictors' own ``mask`` on that input
(or the rule's top-k of the float64 h), unions over the tokens of a batch or a decode step
taken from the trace's token metadata, and the handle's own per-step statistics.

    pytest -q tests/test_record_sparse.py
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import sparselab as sl
from sparselab.recording import Recorder, record
from sparselab.recording.trace_file import TraceFileError
from sparselab.runtime import SparseMLP, sparsify
from sparselab.testing.tiny import WORD_TOKEN_IDS, tiny_llama, word_tokenizer

N_LAYERS, HIDDEN, NEURONS, VOCAB = 3, 32, 80, 100  # 80 neurons: a partial last word
TEXTS = ["w10 w11 w12 w13 w14 w15", "w40 w41 w42", "w50 w51 w52 w53 w54", "w60 w61",
         "w20 w21 w22 w23", "w70 w71 w72 w73 w74 w75 w76"] * 3
PROMPTS = ["w10 w11 w12 w13", "w44 w45"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_model():
    return tiny_llama(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=NEURONS,
                      num_layers=N_LAYERS, max_position_embeddings=64, **WORD_TOKEN_IDS)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def tokenizer():
    return word_tokenizer(VOCAB)


@pytest.fixture(scope="module")
def dense_trace(model, tokenizer):
    return record(model, tokenizer, TEXTS, dtype=torch.float32, progress=False)


@pytest.fixture(scope="module")
def predictors(dense_trace):
    return sl.train_predictors(dense_trace, rule=sl.rules.Calibrated(density=0.4), rank=4,
                               progress=False)


@pytest.fixture(scope="module")
def weights(model):
    """float64 (gate, up) of every layer, read from the dense model before any sparsify."""
    return {i: (layer.mlp.gate_proj.weight.detach().double().clone(),
                layer.mlp.up_proj.weight.detach().double().clone())
            for i, layer in enumerate(model.model.layers)}


def reference_h(weights, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 (act(gate x) * up x, act(gate x)) of rows ``x`` from the weights."""
    gate, up = weights[layer]
    x64 = x.double()
    a = torch.nn.functional.silu(x64 @ gate.T)
    return a * (x64 @ up.T), a


def check_values(trace, weights, layers=range(N_LAYERS)) -> None:
    """h and gate equal the float64 reference at the computed neurons and are 0 elsewhere."""
    for layer in layers:
        computed = trace.computed(layer)
        h_ref, a_ref = reference_h(weights, layer, trace.mlp_inputs(layer))
        for got, ref in ((trace.activations(layer), h_ref), (trace.gate_activations(layer), a_ref)):
            assert not got[~computed].any(), f"layer {layer}: nonzero values outside computed"
            torch.testing.assert_close(got[computed].double(), ref[computed], rtol=1e-4, atol=1e-5)


def generate(model, tokenizer, prompts=PROMPTS, n=4):
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model.generate(**batch, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                              pad_token_id=0)


def hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def observer_count(model) -> int:
    return sum(len(m._observers) for m in model.modules() if isinstance(m, SparseMLP))


def union_by(keys: np.ndarray, masks: torch.Tensor) -> torch.Tensor:
    """Each token's row replaced by the union (OR) of the rows sharing its key."""
    out = torch.empty_like(masks)
    for key in np.unique(keys):
        rows = torch.from_numpy(np.flatnonzero(keys == key))
        out[rows] = masks[rows].any(0)
    return out


# ------------------------------------------------------------------- generate() with a Recorder


@pytest.mark.parametrize("prefill", ["dense", "union", "per_token"])
def test_generate_on_a_sparse_model_records_what_each_step_computed(model, tokenizer, predictors,
                                                                      weights, prefill):
    with sparsify(model, predictors, kernel="torch", prefill=prefill):
        with Recorder(model, tokenizer=tokenizer, dtype=torch.float32) as rec:
            generate(model, tokenizer)
    trace = rec.trace
    # 4 new tokens per prompt: 3 of them are fed back as decode steps 1..3
    decode = ~trace.is_prefill
    assert decode.sum() == 2 * 3 and sorted(set(trace.steps[decode])) == [1, 2, 3]
    assert trace.sparse["mode"] == "predicted" and trace.sparse["prefill"] == prefill
    assert trace.sparse["recorded_layers"] == list(range(N_LAYERS))
    for layer in range(N_LAYERS):
        own = predictors.mask(layer, trace.mlp_inputs(layer))          # each token's own set
        expected = union_by(trace.steps, own)                          # decode: the step's union
        if prefill == "dense":
            expected[trace.is_prefill] = True
        elif prefill == "union":  # one union over both prompts' (unpadded) tokens
            expected[trace.is_prefill] = own[trace.is_prefill].any(0)
        else:
            expected[trace.is_prefill] = own[trace.is_prefill]
        assert torch.equal(trace.computed(layer), expected), layer
    check_values(trace, weights)


def test_recording_does_not_change_what_the_sparse_model_generates(model, tokenizer, predictors):
    # direct kernel: the weight cache's row order depends on its history, so two runs
    # through it agree only to float rounding
    for prefill in ("dense", "union"):
        with sparsify(model, predictors, prefill=prefill, use_cache=False):
            alone = generate(model, tokenizer)
            with torch.no_grad():
                logits = model(**tokenizer(PROMPTS[:1], return_tensors="pt")).logits
            with Recorder(model, store=("h",)):
                recorded = generate(model, tokenizer)
                with torch.no_grad():
                    logits_rec = model(**tokenizer(PROMPTS[:1], return_tensors="pt")).logits
        assert torch.equal(alone, recorded), prefill
        assert torch.equal(logits, logits_rec), prefill


def test_fused_selector_decode_records_the_set_the_kernel_used(model, tokenizer, predictors, weights):
    # float32 low-rank predictors + fast kernel: decode steps select in C and run the cache
    with sparsify(model, predictors) as handle:
        with Recorder(model, dtype=torch.float32) as rec:
            generate(model, tokenizer)
        stats = handle.stats()
    trace = rec.trace
    decode = stats[stats.phase == "decode"].set_index(["step", "layer"]).active
    steps = sorted(set(trace.steps[~trace.is_prefill]))
    for layer in range(N_LAYERS):
        computed = trace.computed(layer)
        for k, step in enumerate(steps):  # model forward k + 1 (0 was the prompt)
            rows = np.flatnonzero(trace.steps == step)
            assert computed[rows[0]].sum() == decode[(k + 1, layer)]
            assert all(torch.equal(computed[r], computed[rows[0]]) for r in rows)
    check_values(trace, weights)


def test_per_row_decode_records_each_rows_own_set(model, tokenizer, predictors, weights):
    with sparsify(model, predictors, kernel="torch", union=False):
        with Recorder(model, dtype=torch.float32) as rec:
            generate(model, tokenizer)
    trace = rec.trace
    decode = ~trace.is_prefill
    for layer in range(N_LAYERS):
        own = predictors.mask(layer, trace.mlp_inputs(layer))
        assert torch.equal(trace.computed(layer)[decode], own[decode])
    check_values(trace, weights)


def test_static_and_oracle_decode_steps(model, tokenizer, weights):
    static = {i: np.arange(i, NEURONS, 3) for i in range(N_LAYERS)}
    with sparsify(model, mode="static", static_neurons=static):
        with Recorder(model, dtype=torch.float32) as rec:
            generate(model, tokenizer)
    trace = rec.trace
    for layer in range(N_LAYERS):
        expected = torch.zeros(NEURONS, dtype=torch.bool)
        expected[static[layer]] = True
        assert (trace.computed(layer)[~trace.is_prefill] == expected).all()
    check_values(trace, weights)

    keep = 0.25
    with sparsify(model, mode="oracle", rule=sl.rules.TopK(keep=keep), union=False):
        with Recorder(model, dtype=torch.float32) as rec:
            generate(model, tokenizer)
    trace = rec.trace
    for layer in range(N_LAYERS):
        computed = trace.computed(layer)[~trace.is_prefill]
        assert (computed.sum(1) == round(keep * NEURONS)).all()
        h_ref, _ = reference_h(weights, layer, trace.mlp_inputs(layer)[~trace.is_prefill])
        # the computed neurons are the largest |h| of each token (float64 reference)
        low = torch.where(computed, h_ref.abs(), torch.inf).min(1).values
        high = torch.where(computed, -torch.inf, h_ref.abs()).max(1).values
        assert (low >= high - 1e-6).all()
    check_values(trace, weights)


def test_int8_weights_record_the_dequantized_h(model, tokenizer, predictors):
    with sparsify(model, predictors, weights="int8"):
        # while sparsified the model's tensors hold the int8 weights' dequantized values
        dequantized = {i: (layer.mlp.gate_proj.weight.detach().double().clone(),
                           layer.mlp.up_proj.weight.detach().double().clone())
                       for i, layer in enumerate(model.model.layers)}
        with Recorder(model, dtype=torch.float32) as rec:
            generate(model, tokenizer)
    check_values(rec.trace, dequantized)


@pytest.mark.parametrize("dtype,capacity", [(torch.float32, None), (torch.bfloat16, None),
                                            (torch.float32, 0.2)])
def test_weights_on_disk_record_the_files_rows(tokenizer, predictors, tmp_path, dtype, capacity):
    from sparselab.runtime.weight_file import write_mlp_file

    model = tiny_model().to(dtype)
    weights = {i: (layer.mlp.gate_proj.weight.detach().double().clone(),
                   layer.mlp.up_proj.weight.detach().double().clone())
               for i, layer in enumerate(model.model.layers)}
    path = write_mlp_file(model, tmp_path / "mlp.bin")
    with sparsify(model, predictors.to(dtype), weight_file=path, prefill="union", kernel="fast",
                  cache_capacity=capacity) as handle:
        assert model.model.layers[0].mlp.gate_proj.weight.numel() == 0  # read from the file
        with Recorder(model, dtype=torch.float32) as rec:
            generate(model, tokenizer)
        stats = handle.stats()
    trace = rec.trace
    decode = stats[stats.phase == "decode"].set_index(["step", "layer"]).active
    for layer in range(N_LAYERS):  # each decode step computed its own set (window or not)
        for k, step in enumerate(sorted(set(trace.steps[~trace.is_prefill]))):
            rows = np.flatnonzero(trace.steps == step)
            assert trace.computed(layer)[rows[0]].sum() == decode[(k + 1, layer)]
    assert not trace.computed(0).all()
    check_values(trace, weights)


def test_method_mode_records_the_selection(model, tokenizer, dense_trace, weights):
    method = sl.prediction.methods.Oracle(density=0.3).fit(model, dense_trace)
    with sparsify(model, method=method, prefill="per_token"):
        with Recorder(model, dtype=torch.float32) as rec:
            generate(model, tokenizer)
    trace = rec.trace
    assert trace.sparse["mode"] == "method" and trace.sparse["method"]["method"] == "oracle"
    for layer in range(N_LAYERS):
        assert (trace.computed(layer).sum(1) == round(0.3 * NEURONS)).all()
    check_values(trace, weights)


# ------------------------------------------------------------------------------ record()


def test_record_under_union_prefill_marks_the_batch_union(model, tokenizer, predictors, weights,
                                                          tmp_path):
    with sparsify(model, predictors, prefill="union"):
        trace = record(model, tokenizer, TEXTS[:6], batch_size=4, dtype=torch.float32,
                       progress=False)
        streamed = record(model, tokenizer, TEXTS[:6], batch_size=4, dtype=torch.float32,
                          progress=False, out=tmp_path / "run.zarr")
    batch_of = trace.seq_ids // 4
    for layer in range(N_LAYERS):
        own = predictors.mask(layer, trace.mlp_inputs(layer))
        assert torch.equal(trace.computed(layer), union_by(batch_of, own))
        assert torch.equal(streamed.computed(layer), trace.computed(layer))
        torch.testing.assert_close(streamed.activations(layer), trace.activations(layer))
    check_values(trace, weights)
    assert streamed.sparse == trace.sparse and trace.sparse["prefill"] == "union"


def test_per_token_prefill_no_longer_passes_masked_h_as_dense(model, tokenizer, predictors,
                                                              dense_trace):
    with sparsify(model, predictors, prefill="per_token"):
        trace = record(model, tokenizer, TEXTS, dtype=torch.float32, progress=False)
    assert trace.sparse is not None and dense_trace.sparse is None
    for layer in range(N_LAYERS):
        computed = trace.computed(layer)
        assert torch.equal(computed, predictors.mask(layer, trace.mlp_inputs(layer)))
        assert 0.2 < computed.float().mean() < 0.6
        assert not trace.activations(layer)[~computed].any()
    # layer 0 sees the same input as in the dense recording: its h agrees where computed
    computed, dense_h = trace.computed(0), dense_trace.activations(0)
    torch.testing.assert_close(trace.activations(0)[computed], dense_h[computed])
    assert dense_h[~computed].any()


def test_memory_estimate_counts_the_computed_bits(model, tokenizer, predictors):
    from sparselab.recording.recorder import estimate_trace_bytes

    dense = estimate_trace_bytes(model, 100, store=("h",))
    with sparsify(model, predictors, prefill="union"):
        assert Recorder(model).sparse
        assert estimate_trace_bytes(model, 100, store=("h",)) == dense + 100 * N_LAYERS * 2 * 8
        trace = record(model, tokenizer, TEXTS[:4], store=("h",), progress=False)
        estimate = estimate_trace_bytes(model, trace.n_tokens, store=("h",))
    nbytes = sum(v.numel() * v.element_size() for v in trace.arrays.values())
    assert nbytes + 41 * trace.n_tokens == estimate  # arrays exactly, plus the token metadata


def test_dense_layers_of_a_sparse_recording_are_all_computed(model, tokenizer, predictors):
    with sparsify(model, predictors, layers=[1], prefill="union"):
        trace = record(model, tokenizer, TEXTS[:4], progress=False)
    assert trace.sparse["recorded_layers"] == [1]
    assert trace.computed(0).all() and trace.computed(2).all()
    assert not trace.computed(1).all()


def test_dense_recording_has_no_computed_array(dense_trace):
    assert "computed" not in dense_trace.arrays and dense_trace.sparse is None
    assert dense_trace.computed(1).shape == (dense_trace.n_tokens, NEURONS)
    assert dense_trace.computed(1).all()
    assert (sl.metrics.density(dense_trace.computed_masks()).density == 1.0).all()
    with pytest.raises(KeyError, match="trace.computed"):
        dense_trace.values("computed", 0)


def test_computed_masks_feed_the_metrics(model, tokenizer, predictors):
    with sparsify(model, predictors, prefill="per_token"):
        trace = record(model, tokenizer, TEXTS[:6], progress=False)
    masks = trace.computed_masks()
    assert masks.rule["name"] == "computed" and masks.rule["sparse"]["mode"] == "predicted"
    df = sl.metrics.density(masks)
    for layer in range(N_LAYERS):
        got = df[df.layer == layer].sort_values("token").density.to_numpy()
        np.testing.assert_allclose(got, trace.computed(layer).float().mean(1).numpy())
    assert not sl.metrics.churn(masks).empty


# ----------------------------------------------------------------------------- files


def test_sparse_trace_round_trips_through_trace_files_and_zarr(model, tokenizer, predictors,
                                                                tmp_path):
    with sparsify(model, predictors, prefill="union"):
        with Recorder(model, tokenizer=tokenizer) as rec:
            generate(model, tokenizer)
    trace = rec.trace
    loaded = sl.Trace.load(trace.save(tmp_path / "a.trace"))
    opened = sl.Trace.open(trace.save(tmp_path / "a.zarr"))
    back = sl.Trace.load(opened.save(tmp_path / "b.trace"))  # zarr -> trace conversion
    for other in (loaded, opened, back):
        assert other.sparse == trace.sparse
        for layer in range(N_LAYERS):
            assert torch.equal(other.computed(layer), trace.computed(layer))
            assert torch.equal(other.activations(layer), trace.activations(layer))
    assert opened.select_tokens([0, 3]).computed(2).shape == (2, NEURONS)


def test_trace_file_with_an_altered_computed_array_is_refused(model, tokenizer, predictors, tmp_path):
    from safetensors.torch import load_file, save_file

    with sparsify(model, predictors, prefill="union"):
        trace = record(model, tokenizer, TEXTS[:2], progress=False)
    path = trace.save(tmp_path / "a.trace")
    tensors = load_file(str(path))
    header = sl.recording.trace_file._read_header(path)
    import json

    for name, bad in (("float", tensors["array.computed"].double()),
                      ("width", tensors["array.computed"][:, :, :1].contiguous())):
        altered = dict(tensors, **{"array.computed": bad})
        save_file(altered, str(tmp_path / f"{name}.trace"),
                  metadata={"sparselab.trace": json.dumps(header)})
        with pytest.raises(TraceFileError, match="computed"):
            sl.Trace.load(tmp_path / f"{name}.trace")


# ------------------------------------------------------------------------ hooks and misuse


def test_hooks_and_observers_are_removed_on_exception(model, tokenizer, predictors):
    with sparsify(model, predictors):
        hooks = hook_count(model)
        with pytest.raises(KeyboardInterrupt), Recorder(model) as rec:
            generate(model, tokenizer, n=2)
            assert observer_count(model) == N_LAYERS
            raise KeyboardInterrupt
        assert hook_count(model) == hooks and observer_count(model) == 0
        assert not rec.active
        assert rec.trace.n_tokens > 0  # what ran before the exception is kept


def test_sparsifying_or_restoring_inside_the_recorder_is_a_clear_error(model, tokenizer, predictors):
    with Recorder(model, store=("h",)) as rec:
        generate(model, tokenizer, n=2)
        n = rec.trace.n_tokens
        with sparsify(model, predictors), pytest.raises(RuntimeError, match="replaced"):
            generate(model, tokenizer, n=2)
    assert rec.trace.n_tokens == n and "computed" not in rec.trace.arrays

    handle = sparsify(model, predictors)
    with Recorder(model, store=("h",)) as rec:
        generate(model, tokenizer, n=2)
        handle.restore()
        with pytest.raises(RuntimeError, match="replaced"):
            generate(model, tokenizer, n=2)
    assert rec.trace.sparse is not None and observer_count(model) == 0


def test_recorder_made_before_sparsify_follows_the_model_when_entered(model, tokenizer, predictors):
    rec = Recorder(model, store=("h",))
    with sparsify(model, predictors), rec:
        generate(model, tokenizer, n=2)
    assert rec.trace.sparse["mode"] == "predicted"
    with pytest.raises(RuntimeError, match="mix dense and sparse"), rec:
        pass


def test_observe_checks_its_argument(model, predictors):
    with sparsify(model, predictors) as handle:
        with pytest.raises(TypeError, match="callable"):
            handle.wrappers[0].observe("not a function")
        calls = []
        h = handle.wrappers[0].observe(calls.append)
        with torch.no_grad():
            model(torch.tensor([[5, 6, 7]]))
        h.remove()
        with torch.no_grad():
            model(torch.tensor([[5, 6, 7]]))
    assert len(calls) == 1 and calls[0].layer == 0 and calls[0].phase == "prefill"
    assert calls[0].computed.shape == (1, 3, NEURONS) and calls[0].computed.all()
