"""sparselab.sparse: the sparse model against independent float64 recomputations from weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import sparselab as sl
from sparselab.prediction import static_from_trace
from sparselab.recording import Trace
from sparselab.runtime import AlreadySparsifiedError, SparseMLP, sparsify
from sparselab.testing import tiny

H, N, LAYERS, VOCAB = 64, 200, 3, 101  # N not a multiple of 64: exercises the tail word


def tiny_llama(seed: int = 0):
    return tiny.tiny_llama(vocab_size=VOCAB, hidden_size=H, intermediate_size=N,
                           num_layers=LAYERS, seed=seed, max_position_embeddings=64,
                           pad_token_id=0)


def tiny_phi3(seed: int = 0):
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(seed)
    cfg = Phi3Config(vocab_size=VOCAB, hidden_size=H, intermediate_size=N, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                     pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return Phi3ForCausalLM(cfg).eval()


class StandInPredictors:
    """Low-rank scores x @ A @ B, top-``density`` per token: the Predictors API surface."""

    def __init__(self, hidden=H, neurons=N, layers=range(LAYERS), density=0.3, lookahead=False,
                 seed=1):
        g = torch.Generator().manual_seed(seed)
        self.A = {i: torch.randn(hidden, 8, generator=g) for i in layers}
        self.B = {i: torch.randn(8, neurons, generator=g) for i in layers}
        self.layers = tuple(layers)
        self.lookahead = lookahead
        self.density = density
        self.bytes = sum(a.numel() * 4 + b.numel() * 4 for a, b in zip(self.A.values(), self.B.values(), strict=True))

    def scores(self, layer, x):
        return x.float() @ self.A[layer] @ self.B[layer]

    def mask(self, layer, x):
        s = self.scores(layer, x)
        k = int(round(self.density * s.shape[-1]))
        out = torch.zeros(s.shape, dtype=torch.bool)
        out.scatter_(-1, s.topk(k, dim=-1).indices, True)
        return out

    def union_mask(self, layer, x):
        return self.mask(layer, x).any(0)

    # the rest of the MaskPredictor protocol
    hidden_size, n_neurons, dtype = property(lambda s: s.A[s.layers[0]].shape[0]), \
        property(lambda s: s.B[s.layers[0]].shape[1]), torch.float32

    def low_rank_form(self, layer):
        return None  # no bias, top-k of x @ A @ B: run in torch

    def at_density(self, density):
        out = StandInPredictors.__new__(StandInPredictors)
        out.__dict__.update(self.__dict__, density=density)
        return out

    def describe(self):
        return {"kind": "stand-in", "density": self.density}


def silu64(v):
    return v * torch.sigmoid(v)


def ref_mlp(mlp, x, mask):
    """down((silu(gate x) * up x) * mask) in float64 straight from the dense weights."""
    if hasattr(mlp, "gate_up_proj"):
        w = mlp.gate_up_proj.weight.double()
        gate, up = w[:N], w[N:]
    else:
        gate, up = mlp.gate_proj.weight.double(), mlp.up_proj.weight.double()
    x64 = x.double()
    h = silu64(x64 @ gate.T) * (x64 @ up.T)
    return (h * mask.double()) @ mlp.down_proj.weight.double().T, h


def snapshot(model):
    return ({k: v.detach().clone() for k, v in model.state_dict().items()},
            [type(m) for m in model.modules()],
            sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()))


def assert_unchanged(model, snap):
    state, types, n_hooks = snap
    now = model.state_dict()
    assert now.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(now[k], v), k
        assert now[k].is_contiguous(), k
    assert [type(m) for m in model.modules()] == types
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == n_hooks


def capture(model, layer):
    """Record (input, output) of layer ``layer``'s MLP module (sparse wrapper or dense)."""
    calls = []
    handle = model.model.layers[layer].mlp.register_forward_hook(
        lambda m, i, o: calls.append((i[0].detach().clone(), o.detach().clone())))
    return calls, handle


IDS = torch.tensor([[5, 17, 33, 2, 90, 41, 7], [8, 8, 60, 12, 3, 77, 19]])


def dense_logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def generate(model, ids=IDS, n=4):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                              min_new_tokens=n, do_sample=False, pad_token_id=0)


# ----------------------------------------------------------------------------- exactness


def test_oracle_density_one_is_bit_identical_to_dense():
    model = tiny_llama()
    dense = dense_logits(model)
    for prefill in ("per_token", "union"):
        with sparsify(model, mode="oracle", density=1.0, prefill=prefill):
            assert torch.equal(dense_logits(model), dense)


@pytest.mark.parametrize("mode", ["predicted", "static", "oracle"])
def test_restore_gives_bit_identical_logits(mode):
    model = tiny_llama()
    dense = dense_logits(model)
    snap = snapshot(model)
    kwargs = {"predicted": {"predictors": StandInPredictors()},
              "static": {"static_neurons": {i: np.arange(0, N, 3) for i in range(LAYERS)}},
              "oracle": {"rule": sl.rules.TopK(0.3)}}[mode]
    handle = sparsify(model, mode=mode, prefill="per_token", **kwargs)
    sparse = dense_logits(model)
    generate(model)
    handle.restore()
    handle.restore()  # harmless
    assert (sparse - dense).abs().max() > 1e-3
    assert torch.equal(dense_logits(model), dense)
    assert_unchanged(model, snap)


DECODE_CASES = [
    ("predicted", {}),
    ("predicted", {"use_cache": False}),
    ("predicted", {"union": False}),
    ("predicted", {"union": False, "use_cache": False}),
    ("predicted", {"kernel": "torch"}),
    ("oracle", {}),
    ("oracle", {"union": False}),
    ("static", {}),
    ("static", {"kernel": "torch"}),
]


@pytest.mark.parametrize("mode,kwargs", DECODE_CASES)
def test_decode_step_equals_dense_with_inactive_neurons_zeroed(mode, kwargs):
    model = tiny_llama()
    layer = 1
    pred = StandInPredictors(density=0.3)
    static = {i: np.sort(np.random.default_rng(i).choice(N, 50, replace=False)) for i in range(LAYERS)}
    args = {"predicted": {"predictors": pred}, "oracle": {"rule": sl.rules.TopK(0.25)},
            "static": {"static_neurons": static}}[mode]
    with sparsify(model, mode=mode, **args, **kwargs):
        calls, hook = capture(model, layer)
        generate(model, n=4)
        hook.remove()
    assert [tuple(x.shape[:2]) for x, _ in calls] == [(2, 7), (2, 1), (2, 1), (2, 1)]
    mlp = model.model.layers[layer].mlp
    union = kwargs.get("union", True)
    for x, y in calls[1:]:  # decode steps
        x2 = x.reshape(2, H)
        if mode == "predicted":
            m = pred.mask(layer, x2)
        elif mode == "oracle":
            _, h = ref_mlp(mlp, x2, torch.ones(N, dtype=torch.bool))
            m = sl.rules.TopK(0.25).mask(h, layer)
        else:
            m = torch.zeros(2, N, dtype=torch.bool)
            m[:, static[layer]] = True
        if union:
            m = m.any(0, keepdim=True).expand(2, N)
        expected, _ = ref_mlp(mlp, x2, m)
        full, _ = ref_mlp(mlp, x2, torch.ones(2, N, dtype=torch.bool))
        torch.testing.assert_close(y.reshape(2, H).double(), expected, rtol=1e-4, atol=1e-5)
        assert (expected - full).abs().max() > 1e-3  # sparsity really changed the output
    # the prefill call stays dense by default
    x, y = calls[0]
    full, _ = ref_mlp(mlp, x.reshape(-1, H), torch.ones(N, dtype=torch.bool))
    torch.testing.assert_close(y.reshape(-1, H).double(), full, rtol=1e-4, atol=1e-5)


def threshold_predictors(density=0.3, seed=2, lookahead=False):
    """Real ``Predictors`` with a density policy (thresholds from scores of random inputs):
    the decode step then takes the fused C selector instead of torch ops."""
    from sparselab.masking.thresholds import quantile_grid
    from sparselab.prediction import Policy, Predictors

    g = torch.Generator().manual_seed(seed)
    weights, calibration = {}, {}
    for i in range(LAYERS):
        first, second, bias = torch.randn(8, H, generator=g), torch.randn(N, 8, generator=g), torch.randn(N, generator=g)
        scores = torch.addmm(bias, torch.randn(256, H, generator=g) @ first.T, second.T)
        weights[i], calibration[i] = (first, second, bias), (quantile_grid(scores), quantile_grid(scores))
    return Predictors(weights, sl.rules.TopK(0.3), policy=Policy("density", density), calibration=calibration,
                      lookahead=lookahead)


@pytest.mark.parametrize("use_cache,dtype", [(False, torch.float32), (True, torch.float32),
                                             (False, torch.bfloat16)])
def test_fused_selector_decode_equals_the_predictors_union_mask(use_cache, dtype):
    model = tiny_llama().to(dtype)
    pred = threshold_predictors()
    layer = 2
    tol = {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    with sparsify(model, pred, mode="predicted", use_cache=use_cache) as handle:
        wrapper = model.model.layers[layer].mlp
        assert wrapper._selector is not None
        calls, hook = capture(model, layer)
        generate(model, n=3)
        hook.remove()
        stats = handle.stats()
    mlp = model.model.layers[layer].mlp
    decode = stats[(stats["layer"] == layer) & (stats["phase"] == "decode")]
    assert len(decode) == 2  # 3 new tokens: 1 from the prefill, 2 decode steps
    for (x, y), active in zip(calls[1:], decode["active"], strict=True):
        x2 = x.reshape(2, H)
        union = pred.union_mask(layer, x2.float())  # the torch path: scores > threshold, any
        assert 0 < int(union.sum()) < N and int(active) == int(union.sum())
        expected, _ = ref_mlp(mlp, x2, union.expand(2, N))
        assert y.dtype == dtype
        torch.testing.assert_close(y.reshape(2, H).double(), expected, **tol)
    assert torch.equal(wrapper.last_mask, union)  # the set of the last step


def test_fused_selector_reads_the_input_norm_output_for_lookahead_predictors():
    model = tiny_llama()
    pred = threshold_predictors(lookahead=True)
    layer = 1
    norm_out = []
    norm_hook = model.model.layers[layer].input_layernorm.register_forward_hook(
        lambda m, i, o: norm_out.append(o.detach().clone()))
    with sparsify(model, pred, mode="predicted"):
        assert model.model.layers[layer].mlp._selector is not None
        calls, hook = capture(model, layer)
        generate(model, n=2)
        hook.remove()
    norm_hook.remove()
    x, y = calls[1]
    m = pred.union_mask(layer, norm_out[1].reshape(2, H))
    assert not torch.equal(m, pred.union_mask(layer, x.reshape(2, H)))
    expected, _ = ref_mlp(model.model.layers[layer].mlp, x.reshape(2, H), m)
    torch.testing.assert_close(y.reshape(2, H).double(), expected, rtol=1e-4, atol=1e-5)


def test_generated_logits_match_an_independent_sparse_model():
    """Logits of a sparse decode step == a dense model whose down_proj inputs are masked."""
    model = tiny_llama()
    pred = StandInPredictors(density=0.4)
    with sparsify(model, pred, mode="predicted", use_cache=True):
        with torch.no_grad():
            out = model.generate(IDS, attention_mask=torch.ones_like(IDS), max_new_tokens=3,
                                 min_new_tokens=3, do_sample=False, pad_token_id=0,
                                 output_logits=True, return_dict_in_generate=True)
    sparse_last = out.logits[-1]
    # reference: plain dense model, full sequence (no KV cache), the union mask of each
    # decode position applied through pre-hooks on down_proj (prompt positions stay dense)
    seq = out.sequences[:, :-1]
    hooks = []
    for i, layer in enumerate(model.model.layers):
        mlp = layer.mlp
        store = {}
        hooks.append(mlp.register_forward_pre_hook(lambda m, a, s=store: s.update(x=a[0])))

        def mask_last(m, a, s=store, i=i):
            h = a[0].clone()
            for pos in range(IDS.shape[1], h.shape[1]):  # every decode position, own union
                h[:, pos] = h[:, pos] * pred.mask(i, s["x"][:, pos]).any(0)
            return (h,)

        hooks.append(mlp.down_proj.register_forward_pre_hook(mask_last))
    try:
        ref = dense_logits(model, seq)[:, -1]
    finally:
        for h in hooks:
            h.remove()
    torch.testing.assert_close(sparse_last, ref, rtol=1e-4, atol=1e-4)
    assert (dense_logits(model, seq)[:, -1] - ref).abs().max() > 1e-4


def test_prefill_options_match_reference():
    model = tiny_llama()
    layer = 2
    pred = StandInPredictors(density=0.3)
    mlp = model.model.layers[layer].mlp
    for prefill in ("per_token", "union"):
        with sparsify(model, pred, prefill=prefill):
            calls, hook = capture(model, layer)
            dense_logits(model)
            hook.remove()
        x, y = calls[0]
        x2 = x.reshape(-1, H)
        m = pred.mask(layer, x2)
        if prefill == "union":
            m = m.any(0, keepdim=True)
        expected, _ = ref_mlp(mlp, x2, m)
        torch.testing.assert_close(y.reshape(-1, H).double(), expected, rtol=1e-4, atol=1e-5)


def test_union_prefill_ignores_padding_tokens():
    model = tiny_llama()
    layer = 0
    pred = StandInPredictors(density=0.1)
    attn = torch.tensor([[1] * 7, [0, 0, 0, 1, 1, 1, 1]])
    mlp = model.model.layers[layer].mlp
    with sparsify(model, pred, prefill="union"):
        calls, hook = capture(model, layer)
        with torch.no_grad():
            model(IDS, attention_mask=attn)
        hook.remove()
    x, y = calls[0]
    x2 = x.reshape(-1, H)
    m = pred.mask(layer, x2[attn.reshape(-1).bool()]).any(0)
    assert not torch.equal(m, pred.mask(layer, x2).any(0))  # padding would change the union
    expected, _ = ref_mlp(mlp, x2, m)
    torch.testing.assert_close(y.reshape(-1, H).double(), expected, rtol=1e-4, atol=1e-5)


def test_lookahead_predictors_read_the_input_norm_output():
    model = tiny_llama()
    layer = 1
    pred = StandInPredictors(density=0.3, lookahead=True)
    norm_out = []
    model.model.layers[layer].input_layernorm.register_forward_hook(
        lambda m, i, o: norm_out.append(o.detach().clone()))
    with sparsify(model, pred):
        calls, hook = capture(model, layer)
        generate(model, n=2)
        hook.remove()
    x, y = calls[1]
    m = pred.mask(layer, norm_out[1].reshape(2, H)).any(0)
    assert not torch.equal(m, pred.mask(layer, x.reshape(2, H)).any(0))
    expected, _ = ref_mlp(model.model.layers[layer].mlp, x.reshape(2, H), m)
    torch.testing.assert_close(y.reshape(2, H).double(), expected, rtol=1e-4, atol=1e-5)


def test_fused_phi3_runs_sparse_and_restores():
    model = tiny_phi3()
    dense = dense_logits(model)
    pred = StandInPredictors(layers=range(2), density=0.3)
    layer = 1
    with sparsify(model, pred):
        calls, hook = capture(model, layer)
        generate(model, n=2)
        hook.remove()
    x, y = calls[1]
    m = pred.mask(layer, x.reshape(2, H)).any(0)
    expected, _ = ref_mlp(model.model.layers[layer].mlp, x.reshape(2, H), m)
    torch.testing.assert_close(y.reshape(2, H).double(), expected, rtol=1e-4, atol=1e-5)
    assert torch.equal(dense_logits(model), dense)


def test_bf16_path_runs_and_matches_reference():
    model = tiny_llama().to(torch.bfloat16)
    pred = StandInPredictors(density=0.3)
    layer = 1
    for mode, kw in (("predicted", {"predictors": pred}), ("oracle", {"density": 0.5}),
                     ("static", {"static_neurons": {i: np.arange(0, N, 2) for i in range(LAYERS)}})):
        with sparsify(model, mode=mode, **kw):
            calls, hook = capture(model, layer)
            out = generate(model, n=3)
            hook.remove()
        assert out.shape == (2, 10)
        x, y = calls[-1]
        assert y.dtype == torch.bfloat16
        if mode == "predicted":
            x2 = x.reshape(2, H)
            expected, _ = ref_mlp(model.model.layers[layer].mlp, x2, pred.mask(layer, x2).any(0))
            torch.testing.assert_close(y.reshape(2, H).double(), expected, rtol=2e-2, atol=2e-2)


def test_selected_layers_only():
    model = tiny_llama()
    with sparsify(model, StandInPredictors(), layers=[0, 2]) as handle:
        kinds = [type(layer.mlp) for layer in model.model.layers]
        assert handle.layers == (0, 2)
        generate(model, n=3)
        assert set(handle.stats().layer) == {0, 2}
    assert kinds[0] is SparseMLP and kinds[2] is SparseMLP and kinds[1] is not SparseMLP


# ------------------------------------------------------------------------------- memory


def test_down_weight_is_transposed_in_its_own_memory():
    model = tiny_llama()
    before = {n: (p.data_ptr(), p.detach().clone()) for n, p in model.named_parameters()}
    with sparsify(model, StandInPredictors(), use_cache=False) as handle:
        for i, wrapper in handle.wrappers.items():
            down = model.model.layers[i].mlp.down_proj.weight
            name = f"model.layers.{i}.mlp.down_proj.weight"
            # the kernels' [I, H] row-major copy *is* the model's memory: no second copy
            assert wrapper.down_t.data_ptr() == down.data_ptr() == before[name][0]
            assert wrapper.down_t.is_contiguous() and down.stride() == (1, H)
            assert torch.equal(wrapper.down_t, before[name][1].t())
            assert torch.equal(down, before[name][1])
        assert {n for n, _ in model.named_parameters()} == set(before)
        assert handle.extra_bytes == 0
    for n, p in model.named_parameters():
        assert p.data_ptr() == before[n][0], n
        assert p.is_contiguous() and torch.equal(p, before[n][1]), n


def test_cache_holds_only_active_rows():
    model = tiny_llama()
    with sparsify(model, StandInPredictors(density=0.3)) as handle:
        generate(model, n=3)
        for cache in handle.caches.values():
            assert cache.n_active <= cache.capacity <= N
        assert 0 < handle.extra_bytes <= LAYERS * N * 3 * H * 4


# -------------------------------------------------------------------------------- stats


@pytest.mark.parametrize("use_cache", [True, False])
def test_stats_record_churn_of_the_union_masks(use_cache):
    model = tiny_llama()
    pred = StandInPredictors(density=0.3)
    layer = 2
    with sparsify(model, pred, use_cache=use_cache) as handle:
        calls, hook = capture(model, layer)
        generate(model, n=5)
        hook.remove()
        df = handle.stats()
    assert list(df.columns[:4]) == ["mode", "step", "layer", "phase"]
    assert df.groupby("phase").size().to_dict() == {"decode": 4 * LAYERS, "prefill": LAYERS}
    dec = df[(df.phase == "decode") & (df.layer == layer)].sort_values("step")
    masks = [pred.mask(layer, x.reshape(2, H)).any(0) for x, _ in calls[1:]]
    prev = torch.zeros(N, dtype=torch.bool)
    for (_, row), m in zip(dec.iterrows(), masks, strict=True):
        assert row.active == int(m.sum())
        assert row.added == int((m & ~prev).sum())
        assert row.removed == int((prev & ~m).sum())
        if use_cache:
            assert row.rows_copied >= row.added
            assert row.bytes_moved >= row.added * 3 * H * 4
            assert row.t_cache_ns > 0
        assert row.t_predictor_ns > 0 and row.t_mlp_ns > 0
        prev = m
    handle.reset_stats()
    assert handle.stats().empty


def test_record_stats_false_records_nothing():
    model = tiny_llama()
    with sparsify(model, StandInPredictors(), record_stats=False) as handle:
        generate(model, n=2)
        assert handle.stats().empty


def test_per_row_stats_have_one_row_per_batch_row():
    model = tiny_llama()
    with sparsify(model, StandInPredictors(), union=False) as handle:
        generate(model, n=3)
        dec = handle.stats().query("phase == 'decode'")
    assert sorted(set(dec.row)) == [0, 1]
    assert len(dec) == 2 * 2 * LAYERS
    assert (dec.active == int(round(0.3 * N))).all()


# ---------------------------------------------------------------------- context + errors


def test_with_block_restores_after_an_exception():
    model = tiny_llama()
    dense = dense_logits(model)
    snap = snapshot(model)
    with pytest.raises(KeyError, match="boom"):
        with sparsify(model, StandInPredictors(lookahead=True)):
            generate(model, n=2)
            raise KeyError("boom")
    assert_unchanged(model, snap)
    assert not sl.runtime.is_sparsified(model)
    assert torch.equal(dense_logits(model), dense)


def test_sparsifying_twice_raises_and_keeps_the_first():
    model = tiny_llama()
    with sparsify(model, mode="oracle", density=0.5) as handle:
        with pytest.raises(AlreadySparsifiedError, match="already sparsified"):
            sparsify(model, mode="oracle", density=0.3)
        assert handle.active and handle.layers == (0, 1, 2)
        assert all(isinstance(layer.mlp, SparseMLP) for layer in model.model.layers)


ERROR_CASES = [
    ({"mode": "fancy"}, "unknown mode"),
    ({"mode": "oracle", "density": 0.5, "kernel": "cuda"}, "unknown kernel"),
    ({"mode": "oracle", "density": 0.5, "prefill": "sometimes"}, "unknown prefill"),
    ({"mode": "predicted"}, "needs predictors"),
    ({"mode": "predicted", "predictors": StandInPredictors(neurons=100)}, "another model shape"),
    ({"mode": "predicted", "predictors": StandInPredictors(hidden=32)}, "do not fit this model"),
    ({"mode": "predicted", "predictors": StandInPredictors(layers=[0]), "layers": [0, 1]},
     "no predictor for layers \\[1\\]"),
    ({"mode": "oracle", "density": 0.0}, "density"),
    ({"mode": "oracle", "density": 1.5}, "density"),
    ({"mode": "oracle"}, "needs a rule"),
    ({"mode": "oracle", "rule": sl.rules.Calibrated(0.5)}, "not fitted"),
    ({"mode": "static"}, "needs static_neurons"),
    ({"mode": "static", "static_neurons": {0: [1, 2]}, "layers": [0, 1]}, "layers \\[1\\]"),
    ({"mode": "static", "static_neurons": {0: [1, N]}}, "outside"),
    ({"mode": "static", "static_neurons": {0: [3, 3]}}, "duplicate"),
    ({"mode": "oracle", "density": 0.5, "layers": [7]}, "layers must be"),
]


@pytest.mark.parametrize("kwargs,message", ERROR_CASES)
def test_bad_arguments_raise_and_leave_the_model_unchanged(kwargs, message):
    model = tiny_llama()
    snap = snapshot(model)
    with pytest.raises(ValueError, match=message):
        sparsify(model, **kwargs)
    assert_unchanged(model, snap)


def test_failure_while_building_undoes_everything(monkeypatch):
    model = tiny_llama()
    dense = dense_logits(model)
    snap = snapshot(model)
    calls = {"n": 0}
    original_init = SparseMLP.__init__

    def flaky_init(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise MemoryError("no room")
        original_init(self, *a, **k)

    monkeypatch.setattr(SparseMLP, "__init__", flaky_init)
    with pytest.raises(MemoryError):
        sparsify(model, StandInPredictors())
    assert_unchanged(model, snap)
    assert torch.equal(dense_logits(model), dense)


# -------------------------------------------------------------------------------- static


def _hand_trace(h: np.ndarray) -> Trace:
    t = h.shape[1]
    return Trace(layers=(0,), arrays={"h": torch.tensor(h, dtype=torch.float32)},
                 token_ids=np.zeros(t), seq_ids=np.zeros(t), positions=np.arange(t),
                 steps=np.zeros(t), is_prefill=np.ones(t, dtype=bool))


def test_static_from_trace_hand_example():
    # per-token top-2 sets: {0, 1}, {0, 2}, {0, 3}: neuron 0 three times, 1-3 once each;
    # the tie goes to the largest mean |h|: neuron 2 (2/3) over 1 and 3 (1/3)
    trace = _hand_trace(np.array([[[5, 1, 0, 0], [4, 0, 2, 0], [3, 0, 0, -1]]]))
    sets = static_from_trace(trace, sl.rules.TopK(0.5), density=0.5)
    assert sets[0].tolist() == [0, 2]
    assert static_from_trace(trace, sl.rules.TopK(0.25), density=0.25)[0].tolist() == [0]


def test_static_mode_from_a_trace_uses_the_most_frequent_neurons():
    model = tiny_llama()
    g = torch.Generator().manual_seed(0)
    h = torch.randn(LAYERS, 30, N, generator=g)
    h[:, :, 7] += 10.0  # neuron 7 dominates every token
    trace = Trace(layers=tuple(range(LAYERS)), arrays={"h": h}, token_ids=np.zeros(30),
                  seq_ids=np.zeros(30), positions=np.arange(30), steps=np.zeros(30),
                  is_prefill=np.ones(30, dtype=bool))
    with sparsify(model, mode="static", static_neurons=trace, density=0.1) as handle:
        for wrapper in handle.wrappers.values():
            assert len(wrapper.static_idx) == 20 and 7 in wrapper.static_idx.tolist()
        generate(model, n=2)
