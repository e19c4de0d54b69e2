"""Sparse MLP kernels of ``sparselab._fast`` against a float64 dense reference with the other
neurons zeroed: both kernels, every activation, fp32 and bf16, batch 1 and > 1, odd sizes.

    pytest tests/test_fast_mlp.py
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from sparselab import _fast
from sparselab.testing.reference import bf16_rounding_slack, dense_reference, term_scale

SETTINGS = settings(deadline=None, max_examples=50)
DTYPES = [torch.float32, torch.bfloat16]


def make_weights(n_neurons, hidden, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    scale = 1.0 / math.sqrt(hidden)
    gate = (torch.randn(n_neurons, hidden, generator=g) * 2 * scale).to(dtype)
    up = (torch.randn(n_neurons, hidden, generator=g) * scale).to(dtype)
    down = (torch.randn(hidden, n_neurons, generator=g) * scale).to(dtype)
    x = torch.randn(4, hidden, generator=g).to(dtype)
    return gate, up, down, x


def check_close(y, ref, scale, dtype_out, slack=0.0):
    # fp32 accumulation: ~1e-4 of the term size; a bf16 output adds its own rounding (2^-8);
    # slack: bf16_rounding_slack, for a reference that rounds h to bf16
    rtol = 1e-4 if dtype_out == torch.float32 else 1.2e-2
    err = (y.double() - ref).abs()
    bound = rtol * scale + slack + 1e-6
    assert torch.all(err <= bound), f"max err {err.max().item():.3g}, bound {bound.min().item():.3g}"


@SETTINGS
@given(
    n_neurons=st.sampled_from([1, 5, 63, 64, 65, 100, 150]),
    hidden=st.sampled_from([1, 7, 33, 67, 130]),
    batch=st.sampled_from([1, 2, 3]),
    dtype=st.sampled_from(DTYPES),
    activation=st.sampled_from(_fast.ACTIVATIONS),
    density=st.sampled_from([0.0, 0.1, 0.5, 1.0]),
    n_threads=st.sampled_from([1, 2]),
    out_fp32=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_both_kernels_match_dense_reference(n_neurons, hidden, batch, dtype, activation, density,
                                            n_threads, out_fp32, seed):
    gate, up, down, x = make_weights(n_neurons, hidden, dtype, seed % 997)
    x = x[:batch]
    rng = np.random.default_rng(seed)
    mask = rng.random(n_neurons) < density
    out = torch.float32 if out_fp32 else None
    # bf16 weights: the kernels round h to bf16, as a bf16 model feeds its down projection
    bf16 = dtype == torch.bfloat16
    ref = dense_reference(x, gate, up, down, activation, mask_bool=mask, h_bf16=bf16)
    scale = term_scale(x, gate, up, down, activation, mask)
    slack = bf16_rounding_slack(x, gate, up, down, activation, mask) if bf16 else 0.0

    cache = _fast.WeightCache(gate, up, down)
    cache.update(mask)
    y1 = cache.forward(x, activation, n_threads=n_threads, out_dtype=out)
    idx = rng.permutation(np.flatnonzero(mask))  # the by-index kernel must not need sorted indices
    down_t = down.t().contiguous()
    y2 = _fast.sparse_mlp(x, gate, up, down_t, idx, activation, n_threads=n_threads,
                          out_dtype=out)
    want = out or dtype
    for y in (y1, y2):
        assert y.dtype == want and y.shape == (batch, hidden)
        check_close(y, ref, scale, want, slack)
    # 1-D x gives 1-D y, same numbers as the first batch row
    y1d = _fast.sparse_mlp(x[0], gate, up, down_t, idx, activation, n_threads=n_threads,
                           out_dtype=out)
    assert y1d.shape == (hidden,)
    check_close(y1d, ref[0], scale[0], want, slack[0] if bf16 else 0.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", _fast.ACTIVATIONS)
def test_thread_count_does_not_change_the_result(dtype, activation):
    # the down pass splits the *output* between threads, so every y element is summed in the
    # same order whatever the thread count: results are bitwise equal
    gate, up, down, x = make_weights(300, 257, dtype, 3)
    idx = np.arange(0, 300, 2)
    down_t = down.t().contiguous()
    ys = [_fast.sparse_mlp(x, gate, up, down_t, idx, activation, n_threads=t) for t in (1, 2, 3)]
    assert torch.equal(ys[0], ys[1]) and torch.equal(ys[0], ys[2])


def test_larger_shape_and_batch_match_reference():
    gate, up, down, _ = make_weights(1000, 515, torch.float32, 7)
    x = torch.randn(5, 515)
    mask = np.random.default_rng(0).random(1000) < 0.3
    ref = dense_reference(x, gate, up, down, "silu", mask_bool=mask)
    scale = term_scale(x, gate, up, down, "silu", mask)
    y = _fast.sparse_mlp(x, gate, up, down.t().contiguous(), np.flatnonzero(mask), "silu")
    check_close(y, ref, scale, torch.float32)


def test_activations_are_the_models_not_relu():
    # the anchor's bug: a ReLU applied to a SiLU model. Negative gate inputs must leak through.
    gate, up, down, x = make_weights(64, 16, torch.float32, 1)
    idx = np.arange(64)
    down_t = down.t().contiguous()
    ys = {a: _fast.sparse_mlp(x, gate, up, down_t, idx, a) for a in _fast.ACTIVATIONS}
    assert not torch.allclose(ys["silu"], ys["relu"])
    assert not torch.allclose(ys["gelu_tanh"], ys["relu"])
    # dense reference agrees with torch's own layers at full density
    for a, f in [("silu", F.silu), ("relu", F.relu),
                 ("gelu_tanh", lambda v: F.gelu(v, approximate="tanh"))]:
        dense = F.linear(f(F.linear(x.double(), gate.double())) * F.linear(x.double(), up.double()),
                         down.double())
        torch.testing.assert_close(dense_reference(x, gate, up, down, a), dense)
        torch.testing.assert_close(ys[a].double(), dense, rtol=1e-4, atol=1e-5)


def test_extreme_inputs_stay_finite():
    gate, up, down, _ = make_weights(32, 8, torch.float32)
    x = torch.full((1, 8), 200.0)
    x[0, ::2] = -200.0
    y = _fast.sparse_mlp(x, gate * 10, up, down.t().contiguous(), np.arange(32), "silu")
    assert torch.all(torch.isfinite(y))


def test_torch_index_tensor_and_int32_indices_accepted():
    gate, up, down, x = make_weights(40, 9, torch.float32)
    down_t = down.t().contiguous()
    a = _fast.sparse_mlp(x, gate, up, down_t, torch.tensor([1, 5, 7]), "relu")
    b = _fast.sparse_mlp(x, gate, up, down_t, np.array([7, 1, 5], np.int32), "relu")
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_bad_kernel_inputs_raise():
    gate, up, down, x = make_weights(40, 9, torch.float32)
    dt = down.t().contiguous()
    ok = np.array([0, 3, 39])
    cases = [
        (dict(active_idx=np.array([0, 40])), "out of range"),
        (dict(active_idx=np.array([-1, 2])), "out of range"),
        (dict(active_idx=np.array([2, 2])), "duplicate"),
        (dict(active_idx=np.array([1.0, 2.0])), "integers"),
        (dict(active_idx=np.array([[1, 2]])), "1-D"),
        (dict(activation="swish"), "unknown activation"),
        (dict(activation=None), "unknown activation"),
        (dict(down_t=down), "expected \\[I, H\\]"),
        (dict(down_t=down.t()), "contiguous"),
        (dict(gate_weight=gate.t().contiguous().t()), "contiguous"),
        (dict(up_weight=up[:20]), "must match"),
        (dict(up_weight=up.bfloat16()), "dtype"),
        (dict(x=x.bfloat16()), "dtype"),
        (dict(x=x[:, :8]), "hidden size"),
        (dict(x=x[None]), "batch, hidden"),
        (dict(n_threads=0), "n_threads"),
        (dict(x=[1.0] * 9), "torch tensor"),
    ]
    for kwargs, msg in cases:
        args = dict(x=x, gate_weight=gate, up_weight=up, down_t=dt, active_idx=ok,
                    activation="silu")
        args.update(kwargs)
        with pytest.raises(ValueError, match=msg):
            _fast.sparse_mlp(**args)


def test_info_reports_the_build():
    info = _fast.info()
    assert set(info) >= {"openmp", "simd", "max_threads"}
    assert isinstance(info["openmp"], bool) and info["max_threads"] >= 1


@pytest.mark.parametrize("dtype", DTYPES)
def test_indexed_mlp_matches_the_reference_call_after_call(dtype):
    # the bound kernel must give what the one-shot call gives, for masks that change
    gate, up, down, x = make_weights(200, 33, dtype, 5)
    down_t = down.t().contiguous()
    bound = _fast.IndexedMLP(gate, up, down_t, "silu")
    rng = np.random.default_rng(1)
    for density in (0.0, 0.1, 0.5, 1.0):
        mask = rng.random(200) < density
        idx = np.flatnonzero(mask)
        y = bound(x, idx)
        assert torch.equal(y, _fast.sparse_mlp(x, gate, up, down_t, idx, "silu"))
        ref = dense_reference(x, gate, up, down, "silu", mask_bool=mask)
        check_close(y, ref, term_scale(x, gate, up, down, "silu", mask), dtype)


def test_indexed_mlp_checks_weights_once_and_inputs_every_call():
    gate, up, down, x = make_weights(40, 9, torch.float32, 2)
    with pytest.raises(ValueError, match="expected \\[I, H\\]"):
        _fast.IndexedMLP(gate, up, down, "silu")
    with pytest.raises(ValueError, match="unknown activation"):
        _fast.IndexedMLP(gate, up, down.t().contiguous(), "swish")
    bound = _fast.IndexedMLP(gate, up, down.t().contiguous(), "silu")
    with pytest.raises(ValueError, match="duplicate"):
        bound(x, np.array([3, 3]))
    with pytest.raises(ValueError, match="out of range"):
        bound(x, np.array([40]))
    with pytest.raises(ValueError, match="hidden size"):
        bound(x[:, :4], np.array([1]))
