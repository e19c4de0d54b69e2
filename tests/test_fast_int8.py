"""int8 weights (per-row scales, per-block scales, per-row with down_t's per-column scales) in
``sparselab._fast``: the quantizer's error bound, the safetensors round trip, both kernels
on every code path the CPU runs against a float64 reference of the dequantized weights,
thread-count independence, and the errors.

    pytest tests/test_fast_int8.py
"""


import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparselab import _fast
from sparselab._fast import isa
from sparselab._fast.quant import (
    KERNEL_BLOCKS,
    Int8Blocks,
    Int8Rows,
    load_int8,
    quantize_int8,
    save_int8,
)
from sparselab.testing.reference import dense_reference
from sparselab.testing.weights import both_kernels, random_int8_mlp

PATHS = isa.supported()
BLOCKS = (None,) + KERNEL_BLOCKS  # per-row scales, then every block size the kernels run
# "rowcol": per row, down_t also per column (quantize_int8(..., col_scales=True))
FORMATS = BLOCKS + ("rowcol",)


def int8_mlp(n, h, seed, fmt):
    """random_int8_mlp in one of FORMATS."""
    if fmt == "rowcol":
        return random_int8_mlp(n, h, seed, None, down_col_scales=True)
    return random_int8_mlp(n, h, seed, fmt)


def test_quantizer_rounds_to_nearest_within_half_a_step():
    w = torch.randn(37, 70) * torch.logspace(-3, 1, 37)[:, None]
    w[5] = 0.0  # an all-zero row quantizes to zeros with scale 0, no NaN
    q = quantize_int8(w)
    assert q.q.dtype == torch.int8 and q.scale.shape == (37,)
    assert torch.allclose(q.scale, w.abs().amax(1) / 127)
    err = (q.dequantize() - w).abs()
    assert torch.all(err <= q.scale[:, None] / 2 * (1 + 1e-6) + 1e-12)
    assert q.q.abs().max() == 127 and torch.all(q.q[5] == 0)
    b = quantize_int8(w, block=10)
    assert isinstance(b, Int8Blocks) and b.scale.shape == (37, 7)
    assert torch.all((b.dequantize() - w).abs() <= b.scale.repeat_interleave(10, 1) / 2 * (1 + 1e-6) + 1e-12)
    # finer scales never do worse than per-row ones on the same weights
    assert (b.dequantize() - w).abs().max() <= err.max() + 1e-7


def test_quantizer_errors():
    with pytest.raises(ValueError, match="floating-point"):
        quantize_int8(torch.ones(3, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="2-D"):
        quantize_int8(torch.ones(4))
    with pytest.raises(ValueError, match="dividing"):
        quantize_int8(torch.ones(3, 10), block=32)
    with pytest.raises(ValueError, match="non-finite"):
        quantize_int8(torch.tensor([[1.0, float("inf")]]))
    with pytest.raises(ValueError, match="scale"):
        Int8Rows(torch.zeros(3, 4, dtype=torch.int8), torch.zeros(2))


def test_column_scales_bound_each_weight_by_half_its_own_step():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(40, 24, generator=g)
    w[:, 7] *= 50.0  # one massive column, as down_t's residual outlier channels
    w[:, 11] = 0.0   # an all-zero column keeps scale 1, quantizes to zeros
    q = quantize_int8(w, col_scales=True)
    assert isinstance(q, Int8Rows) and q.col_scale.shape == (24,) and q.col_scale[11] == 1.0
    step = q.scale[:, None] * q.col_scale[None, :]
    assert torch.all((q.dequantize() - w).abs() <= 0.5 * step * (1 + 1e-5) + 1e-12)
    assert torch.all(q.q[:, 11] == 0)
    # every column's largest weight (after its column scale) still reaches +-127 in some row
    assert torch.all(q.q.abs().amax(0)[torch.arange(24) != 11] >= 64)
    # the point of it: per-row scales follow the massive column, so the other columns
    # lose most of their bits; with column scales they keep them
    plain = quantize_int8(w)
    others = torch.arange(24) != 7
    err_rows = (plain.dequantize() - w)[:, others].abs().mean()
    err_cols = (q.dequantize() - w)[:, others].abs().mean()
    assert err_cols < err_rows / 10
    with pytest.raises(ValueError, match="col_scales=True goes with per-row"):
        quantize_int8(w, block=8, col_scales=True)
    with pytest.raises(ValueError, match=r"col_scale must be float32 \[24\]"):
        Int8Rows(q.q, q.scale, torch.ones(23))


def test_safetensors_round_trip(tmp_path):
    qg, qu, qd, _ = random_int8_mlp(20, 64, 0)
    qb = quantize_int8(qg.dequantize(), block=32)
    save_int8(tmp_path / "l.safetensors", {"gate": qg, "up": qu, "down_t": qd, "blocks": qb})
    back = load_int8(tmp_path / "l.safetensors")
    assert set(back) == {"gate", "up", "down_t", "blocks"}
    assert torch.equal(back["gate"].q, qg.q) and torch.equal(back["down_t"].scale, qd.scale)
    assert isinstance(back["blocks"], Int8Blocks) and back["blocks"].block == 32
    assert torch.equal(back["blocks"].dequantize(), qb.dequantize())
    assert back["down_t"].col_scale is None
    *_, qc, _ = random_int8_mlp(20, 64, 0, down_col_scales=True)
    save_int8(tmp_path / "c.safetensors", {"down_t": qc})
    back = load_int8(tmp_path / "c.safetensors")["down_t"]
    assert torch.equal(back.col_scale, qc.col_scale) and torch.equal(back.dequantize(), qc.dequantize())
    from safetensors.torch import save_file
    save_file({"a": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a sparselab int8"):
        load_int8(tmp_path / "other.safetensors")


@settings(deadline=None, max_examples=40)
@given(path=st.sampled_from(PATHS), n=st.sampled_from([1, 3, 64, 129]),
       h=st.sampled_from([1, 15, 16, 17, 32, 100, 96, 257, 320, 512]), batch=st.sampled_from([1, 3]),
       density=st.sampled_from([0.1, 0.5, 1.0]), n_threads=st.sampled_from([1, 2]),
       x_bf16=st.booleans(), block=st.sampled_from(FORMATS), seed=st.integers(0, 10_000))
def test_int8_kernels_match_float64_reference_of_dequantized_weights(
        path, n, h, batch, density, n_threads, x_bf16, block, seed):
    if isinstance(block, int) and h % block:
        block = None  # blocks must divide the row
    qg, qu, qd, x = int8_mlp(n, h, seed, block)
    x = x[:batch].to(torch.bfloat16) if x_bf16 else x[:batch]
    mask = np.random.default_rng(seed).random(n) < density
    g, u, dt = qg.dequantize(), qu.dequantize(), qd.dequantize()
    ref = dense_reference(x.float(), g, u, dt.t(), "silu", mask_bool=mask)
    v = x.double() @ g.double().T
    hh = (v * torch.sigmoid(v) * (x.double() @ u.double().T)).abs() * torch.as_tensor(mask, dtype=torch.float64)
    bound = 1e-4 * (hh @ dt.double().abs()) + 1e-6
    for y in both_kernels(qg, qu, qd, x, mask, path, n_threads):
        assert y.dtype == torch.float32
        err = (y.double() - ref).abs()
        assert torch.all(err <= bound), f"{path}: max err {err.max().item():.3g}"


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("block", [None, 32, 64, 128, "rowcol"])
def test_int8_bitwise_independent_of_thread_count_and_cache_churn(path, block):
    qg, qu, qd, x = int8_mlp(301, 384, 4, block)
    rng = np.random.default_rng(0)
    with isa.use(path):
        idx = np.flatnonzero(rng.random(301) < 0.4)
        ys = [_fast.sparse_mlp(x, qg, qu, qd, idx, "silu", n_threads=t) for t in (1, 2, 3)]
        assert torch.equal(ys[0], ys[1]) and torch.equal(ys[0], ys[2])
        # a cache that reached the mask through other masks (slots moved, scales with them)
        cache = _fast.WeightCache(qg, qu, down_t=qd)
        for d in (0.9, 0.1, 0.6):
            cache.update(rng.random(301) < d)
        mask = np.zeros(301, bool)
        mask[idx] = True
        cache.update(mask)
        y = cache.forward(x, "silu", n_threads=2)
    ref = _fast.sparse_mlp(x, qg, qu, qd, cache.order, "silu", n_threads=1)
    assert torch.allclose(y, ref, rtol=1e-5, atol=1e-6)


def test_int8_errors_change_nothing():
    qg, qu, qd, x = random_int8_mlp(10, 8, 1)
    with pytest.raises(ValueError, match="int8"):
        _fast.sparse_mlp(x, qg, qu.dequantize(), qd, np.array([0]), "silu")
    with pytest.raises(ValueError, match="down_t="):
        _fast.WeightCache(qg, qu, qd)
    qb = quantize_int8(torch.randn(10, 64), block=32)
    with pytest.raises(ValueError, match="one int8 format"):
        _fast.IndexedMLP(qb, qb, quantize_int8(torch.randn(10, 64)), "silu")
    q16 = quantize_int8(torch.randn(10, 64), block=16)
    with pytest.raises(ValueError, match="the kernels take int8 blocks of"):
        _fast.IndexedMLP(q16, q16, q16, "silu")
    with pytest.raises(ValueError, match="float32 or bfloat16 x"):
        _fast.sparse_mlp(x.double(), qg, qu, qd, np.array([0]), "silu")
    # column scales are read on down_t only (output channels): not on gate or up
    qc = quantize_int8(qg.dequantize(), col_scales=True)
    for args in ((qc, qu, qd), (qg, qc, qd)):
        with pytest.raises(ValueError, match="the kernels take them on down_t only"):
            _fast.IndexedMLP(*args, "silu")
        with pytest.raises(ValueError, match="the kernels take them on down_t only"):
            _fast.WeightCache(args[0], args[1], down_t=args[2])
    from sparselab._fast import _mlp
    with pytest.raises(ValueError, match="out_scale has 7 entries"):
        _mlp.index_forward(qg.q.numpy(), qu.q.numpy(), qd.q.numpy(), np.array([0]), x.numpy(),
                           np.zeros_like(x.numpy()), 0, 1, np.ones((10, 3, 1), np.float32),
                           False, np.ones(7, np.float32))


@pytest.mark.slow
def test_sparsify_int8_runs_the_int8_kernels_keeps_quality_and_restores(real_model):
    import sparselab as sl

    model, tok = real_model
    n_layers, n = model.config.num_hidden_layers, model.config.intermediate_size
    every = {i: np.arange(n) for i in range(n_layers)}
    ids = tok("The capital of France is Paris. The capital of Italy is", return_tensors="pt").input_ids
    w_before = model.model.layers[3].mlp.down_proj.weight.clone()
    with torch.no_grad():
        fp32_logits = model(ids).logits
        with sl.sparsify(model, mode="static", static_neurons=every, weights="int8",
                         prefill="per_token") as h:
            assert h.wrappers[0]._indexed.dtype == torch.int8  # the kernel reads int8 bytes
            # teacher-forced: torch matmuls over the dequantized weights ...
            full = model(ids).logits
            # ... and the last position again as a decode step through the int8 kernel
            out = model(ids[:, :-1], use_cache=True)
            step = model(ids[:, -1:], past_key_values=out.past_key_values, use_cache=True).logits
        assert torch.allclose(step[0, -1], full[0, -1], rtol=1e-3, atol=2e-3)
        assert not torch.equal(full, fp32_logits)  # the model really is quantized
        assert torch.equal(model.model.layers[3].mlp.down_proj.weight, w_before)
        assert torch.equal(model(ids).logits, fp32_logits)  # restored bit for bit

        texts = sl.load_corpus()[-3:]
        df = sl.evaluate(model, tok, texts, densities=(0.5,), modes=("dense",), max_length=128,
                         n_generate=0, progress=False, extra_modes={
                             f: (lambda d, f=f: {"mode": "static", "static_neurons": every,
                                                 "weights": f})
                             for f in ("int8", "int8_rows", "int8_rowcol")})
    ppl = df.set_index("mode")["perplexity"]
    for f in ("int8", "int8_rowcol"):
        assert ppl[f] <= ppl["dense"] * 1.01  # the target: within +1 % of fp32
        assert ppl[f] <= ppl["int8_rows"]     # both keep more than per-row scales alone
