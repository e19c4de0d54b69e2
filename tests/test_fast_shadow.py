"""The compiled shadow selection (``sparselab._fast.shadow``): the 4-bit gate/up scores
against a float64 reference of the dequantized weights and the kernel's int8 x, on every
instruction-set path this CPU runs; the torch quantization of x against the kernel's; the
threshold and top-k selections; thread-count independence; and ``sl.sparsify`` with a
``Shadow(x_bits=8)`` method, whose decode steps run the compiled selection, against the
method's own selection in torch.

    pytest tests/test_fast_shadow.py
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparselab._fast import _predict, isa
from sparselab._fast.shadow import ShadowSelector, pack_shadow, quantize_x
from sparselab.prediction import methods as M
from sparselab.prediction.quantize import dequantize_groups, quantize_groups, quantized_bytes
from sparselab.prediction.selection import run_selection

PATHS = isa.supported()
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _case(n, h, group, seed, zero_groups=True):
    g = torch.Generator().manual_seed(seed)
    gate = torch.randn(n, h, generator=g) * torch.rand(n, 1, generator=g)
    up = torch.randn(n, h, generator=g) * 0.3
    x = torch.randn(3, h, generator=g) * 2
    if zero_groups:
        gate[0, :group] = 0.0      # an all-zero weight group: scale 0
        x[1, :group] = 0.0         # an all-zero input group: sx 0
    return quantize_groups(gate, 4, group), quantize_groups(up, 4, group), x


def _reference(qg, qu, x, group):
    """float64 (gate . x~, up . x~) [B, N, 2] over the dequantized weights and the
    dequantized int8 x the kernel computes with."""
    xq, sx, _ = _predict.shadow_prep_x(x.numpy(), group)
    b, h = xq.shape
    xd = (torch.from_numpy(xq).double().reshape(b, h // group, group)
          * torch.from_numpy(sx).double()[..., None]).reshape(b, h)
    gd, ud = (dequantize_groups(*q, group).double() for q in (qg, qu))
    scale = (xd.abs() @ gd.abs().T, xd.abs() @ ud.abs().T)
    return torch.stack([xd @ gd.T, xd @ ud.T], -1), torch.stack(scale, -1)


@pytest.mark.parametrize("path", PATHS)
@settings(max_examples=12, deadline=None)
@given(n=st.integers(1, 40), groups=st.integers(1, 10), seed=st.integers(0, 2**16))
def test_gate_up_scores_match_float64_reference(path, n, groups, seed):
    group = 64  # neurons in blocks of 8: n not a multiple of 8 pads the last block
    h = groups * group
    qg, qu, x = _case(n, h, group, seed)
    sel = ShadowSelector(*qg, *qu, group, "silu")
    ref, scale = _reference(qg, qu, x, group)
    with isa.use(path):
        got = torch.from_numpy(sel.gate_up(x)).double()
    assert torch.all((got - ref).abs() <= 1e-5 * scale + 1e-6)


@settings(max_examples=20, deadline=None)
@given(h=st.sampled_from([64, 192, 576]), seed=st.integers(0, 2**16), mag=st.floats(1e-3, 1e3))
def test_torch_quantize_x_is_the_kernels(h, seed, mag):
    x = torch.randn(4, h, generator=torch.Generator().manual_seed(seed)) * mag
    x[2, :64] = 0.0
    xq, sx, corr = _predict.shadow_prep_x(x.numpy(), 64)
    assert np.abs(xq.astype(np.int32)).max() <= 127
    assert np.array_equal(corr, 8 * xq.reshape(4, h // 64, 64).astype(np.int32).sum(-1))
    kernel = (torch.from_numpy(xq).float().reshape(4, h // 64, 64) * torch.from_numpy(sx)[..., None]).reshape(4, h)
    # the same grid; a value exactly between two steps may round either way
    step = torch.from_numpy(sx).repeat_interleave(64, dim=1)
    diff = (quantize_x(x) - kernel).abs()
    assert torch.all(diff <= step * 1.001 + 1e-30)
    assert (diff <= 1e-6 * x.abs() + 1e-30).float().mean() > 0.99


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh", "relu"])
def test_threshold_and_top_k_select_from_the_scores(path, activation):
    qg, qu, x = _case(300, 192, 64, seed=7)
    sel = ShadowSelector(*qg, *qu, 64, activation)
    with isa.use(path):
        gu = torch.from_numpy(sel.gate_up(x))
        scores = sel.scores(x)
        act = {"silu": torch.nn.functional.silu, "relu": torch.relu,
               "gelu_tanh": lambda v: torch.nn.functional.gelu(v, approximate="tanh")}[activation]
        expect = (act(gu[..., 0]) * gu[..., 1]).abs().numpy()
        np.testing.assert_allclose(scores, expect, rtol=1e-5, atol=1e-6)
        t = float(np.median(scores))
        idx, mask = sel(x, t)
        assert np.array_equal(mask, (scores > t).any(0))
        assert np.array_equal(idx, np.flatnonzero(mask)) and idx.dtype == np.int64
        idx1, mask1 = sel.top_k(x[:1], 50)
        assert mask1.sum() == 50 and scores[0, idx1].min() >= np.sort(scores[0])[-50]
        assert sel.top_k(x, 0)[0].size == 0 and sel.top_k(x, 300)[0].size == 300
    assert sel.nbytes == 2 * quantized_bytes((300, 192), 4, 64)


@pytest.mark.parametrize("path", PATHS)
def test_scores_do_not_depend_on_the_thread_count(path):
    qg, qu, x = _case(257, 576, 64, seed=3)
    with isa.use(path):
        one = ShadowSelector(*qg, *qu, 64, "silu", n_threads=1).scores(x)
        two = ShadowSelector(*qg, *qu, 64, "silu", n_threads=2).scores(x)
    assert np.array_equal(one, two)


def test_pack_rejects_non_4_bit_codes_and_bad_shapes():
    (cg, sg), (cu, su), _ = _case(4, 128, 64, seed=0)
    with pytest.raises(ValueError, match="outside"):
        pack_shadow(cg * 2, sg, cu, su, 64)
    with pytest.raises(ValueError, match="group 64"):
        pack_shadow(cg, sg, cu, su, 32)
    with pytest.raises(ValueError, match="scales"):
        pack_shadow(cg, sg[:, :1], cu, su, 64)
    sel = ShadowSelector(cg, sg, cu, su, 64, "silu")
    with pytest.raises(ValueError, match="x must be"):
        sel.scores(torch.zeros(2, 64))
    with pytest.raises(ValueError, match="NaN"):
        sel(torch.zeros(1, 128), float("nan"))


# ---- sparsify: decode steps through the compiled selection ------------------------------


def _tiny():
    from sparselab.testing import tiny

    return tiny.tiny_llama(vocab_size=97, hidden_size=128, intermediate_size=256), tiny.word_tokenizer(97)


@pytest.mark.parametrize("calibrated", [False, True])
def test_sparsify_decode_runs_the_compiled_selection(calibrated):
    import sparselab as sl

    model, tok = _tiny()
    ids = torch.randint(3, 97, (1, 12), generator=torch.Generator().manual_seed(0))
    texts = [" ".join(f"w{i}" for i in torch.randint(3, 97, (20,), generator=torch.Generator().manual_seed(s)).tolist())
             for s in range(4)]
    trace = sl.record(model, tok, texts, store=("mlp_in",), progress=False) if calibrated else None
    method = M.Shadow(0.4, calibrated=calibrated, x_bits=8).fit(model, trace)
    assert method.fast_decode and not M.Shadow(0.4).fit(model).fast_decode
    x = torch.randn(1, 1, 128, generator=torch.Generator().manual_seed(1))
    with sl.sparsify(model, method=method) as handle:
        assert handle.config["fast_method_decode"]
        wrapper = model.model.layers[1].mlp
        y = wrapper(x)
        w = wrapper._mlp_weights
        selection = method.select(x.reshape(1, -1), w)
        assert torch.equal(wrapper.last_mask, selection.neurons()[0])
        torch.testing.assert_close(y.reshape(1, -1), run_selection(x.reshape(1, -1), w, selection),
                                   rtol=1e-4, atol=1e-5)
        out = model.generate(ids, max_new_tokens=4, do_sample=False)
        stats = handle.stats()
        share = handle.bytes_share()
    assert out.shape == (1, 16)
    decode = stats[stats.phase == "decode"]
    assert len(decode) >= 2 * 3 and (decode.t_predictor_ns > 0).all() and (decode.t_mlp_ns > 0).all()
    # prefill (dense 4-bit copies counted) and decode steps: some bytes, fewer than dense
    assert 0.0 < share < 1.0
    for layer in model.model.layers:  # restored: dense MLPs, down in its own layout
        assert not hasattr(layer.mlp, "rt") and layer.mlp.down_proj.weight.is_contiguous()


def test_benchmark_method_configs_load_and_mismatched_variants_are_rejected():
    from pathlib import Path

    from sparselab.evaluation.suite import check_config, load_config

    configs = Path(__file__).resolve().parents[1] / "experiments" / "configs"
    for name in ("smollm2_135m_shadow_cal", "smollm2_135m_shadow"):
        config = load_config(configs / f"{name}.json")
        assert config["predictors"]["kind"] == "method" and config["variants"][:2] == ["dense", "sparse_method"]
        with pytest.raises(ValueError, match="sparse_method"):
            check_config({**config, "variants": ["dense", "sparse_direct"]})
    trained = load_config(configs / "smollm2_135m.json")
    with pytest.raises(ValueError, match="sparse_method"):
        check_config({**trained, "variants": ["dense", "sparse_method"]})
    with pytest.raises(ValueError, match="method.name"):
        check_config({**config, "predictors": {"kind": "method", "method": {"name": "teal"}}})


def test_recorder_sees_the_compiled_decode_selection():
    """A Recorder on a model whose decode steps run the compiled shadow selection records
    each step's chosen neurons (the method's own selection of that row) and their h."""
    import sparselab as sl
    from sparselab.recording import Recorder

    model, _ = _tiny()
    ids = torch.randint(3, 97, (1, 10), generator=torch.Generator().manual_seed(2))
    method = M.Shadow(0.4, x_bits=8).fit(model)
    with sl.sparsify(model, method=method) as handle:
        assert handle.config["fast_method_decode"]
        with Recorder(model, store=("mlp_in", "h"), dtype=torch.float32) as rec:
            model.generate(ids, max_new_tokens=3, do_sample=False)
        trace = rec.trace
        weights = {i: model.model.layers[i].mlp._mlp_weights for i in trace.layers}
    decode = torch.from_numpy(~trace.is_prefill)
    assert int(decode.sum()) == 2  # the steps after the first new token
    for layer in trace.layers:
        x = trace.mlp_inputs(layer)[decode]
        chosen = method.select(x, weights[layer]).neurons()
        computed = trace.computed(layer)[decode]
        assert torch.equal(computed, chosen)
        w = weights[layer]
        h_ref = (torch.nn.functional.silu(x.double() @ w.gate.double().T) * (x.double() @ w.up.double().T))
        torch.testing.assert_close(trace.activations(layer)[decode].double(), h_ref * computed,
                                   rtol=1e-4, atol=1e-5)


def test_method_with_dense_prefill_computes_the_prompt_dense_and_decode_sparse():
    """``prefill="dense"``: the prompt's logits are the dense model's, bit for bit, and its
    tokens count as dense bytes; decode steps still run the compiled selection; the
    default (per token) selects for the prompt too; "union" does not apply to a method."""
    import sparselab as sl

    model, _ = _tiny()
    ids = torch.randint(3, 97, (1, 12), generator=torch.Generator().manual_seed(3))
    method = M.Shadow(0.4, x_bits=8).fit(model)
    with torch.no_grad():
        dense = model(input_ids=ids).logits
        with sl.sparsify(model, method=method, prefill="dense") as handle:
            assert handle.config["prefill"] == "dense"
            assert torch.equal(model(input_ids=ids).logits, dense)
            assert handle.bytes_share() == pytest.approx(1.0)  # 12 prompt tokens, all dense
            out = model.generate(ids, max_new_tokens=4, do_sample=False)
            stats = handle.stats()
            share = handle.bytes_share()
        with sl.sparsify(model, method=method) as handle:
            assert handle.config["prefill"] == "per_token"
            assert not torch.allclose(model(input_ids=ids).logits, dense, atol=1e-3)
    assert out.shape == (1, 16)
    decode = stats[stats.phase == "decode"]
    assert len(decode) and (decode.density < 0.6).all()
    # 12 + 12 (generate's prompt) dense tokens and 3 decode steps at ~0.4 of the rows
    # plus the 4-bit copies: below dense, above what the decode steps alone would give
    assert 0.5 < share < 1.0
    with pytest.raises(ValueError, match="not \"union\""):
        sl.sparsify(model, method=method, prefill="union")
    assert not sl.runtime.is_sparsified(model)
