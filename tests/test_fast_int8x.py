"""int8 weights times x rounded to int8 (``x_int8=True``, integer dot products for gate and
up): both kernels on every code path this CPU runs against a float64 reference over the
dequantized weights and the dequantized x, the x rounding itself, thread-count
independence, the path names and the errors.

    pytest tests/test_fast_int8x.py
"""


import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparselab import _fast
from sparselab._fast import isa
from sparselab._fast.quant import KERNEL_BLOCKS, round_x_int8
from sparselab.testing.reference import dense_reference
from sparselab.testing.weights import both_kernels, random_int8_mlp

PATHS = isa.supported()
BLOCKS = (None,) + KERNEL_BLOCKS  # per-row scales, then every block size the kernels run


def x_seen(x):
    """The dequantized x the integer dot products compute with."""
    xq, sx = round_x_int8(x.float())
    return xq.double() * sx.double().repeat_interleave(64, -1)[..., : x.shape[-1]]


def test_round_x_int8_by_hand():
    x = torch.zeros(1, 70)
    x[0, 0], x[0, 1], x[0, 2] = 2.54, -1.0, 0.0101   # group 0: sx = 0.02
    x[0, 64] = -3.0                                     # short group 1 (6 channels)
    xq, sx = round_x_int8(x)
    assert xq.dtype == torch.int8 and sx.shape == (1, 2)
    assert torch.allclose(sx, torch.tensor([[2.54 / 127, 3.0 / 127]]))
    assert xq[0, :3].tolist() == [127, -50, 1] and xq[0, 64] == -127
    # a group of zeros: scale 0, codes 0, no NaN
    zq, zs = round_x_int8(torch.zeros(2, 64))
    assert torch.all(zq == 0) and torch.all(zs == 0)
    # rounding error at most half a step per channel
    r = torch.randn(4, 200)
    err = (x_seen(r) - r.double()).abs()
    assert torch.all(err <= sx_of(r).repeat_interleave(64, -1)[:, :200] / 2 * (1 + 1e-6))


def sx_of(x):
    return round_x_int8(x)[1].double()


@settings(deadline=None, max_examples=40)
@given(path=st.sampled_from(PATHS), n=st.sampled_from([1, 3, 64, 129]),
       h=st.sampled_from([1, 15, 32, 63, 64, 65, 96, 100, 257, 320, 512]),
       batch=st.sampled_from([1, 3]), density=st.sampled_from([0.1, 0.5, 1.0]),
       n_threads=st.sampled_from([1, 2]), x_bf16=st.booleans(),
       block=st.sampled_from(BLOCKS + ("rowcol",)), seed=st.integers(0, 10_000))
def test_int8x_kernels_match_float64_reference(path, n, h, batch, density, n_threads, x_bf16,
                                               block, seed):
    # "rowcol": per row, down_t with column scales too
    rowcol = block == "rowcol"
    block = block if isinstance(block, int) and h % block == 0 else None  # blocks divide the row
    qg, qu, qd, x = random_int8_mlp(n, h, seed, block, outlier=30.0, down_col_scales=rowcol)
    x = x[:batch].to(torch.bfloat16) if x_bf16 else x[:batch]
    mask = np.random.default_rng(seed).random(n) < density
    g, u, dt = qg.dequantize(), qu.dequantize(), qd.dequantize()
    xs = x_seen(x)
    ref = dense_reference(xs, g, u, dt.t(), "silu", mask_bool=mask)
    v = xs @ g.double().T
    hh = (v * torch.sigmoid(v) * (xs @ u.double().T)).abs() * torch.as_tensor(mask, dtype=torch.float64)
    # the integer sums are exact; what remains is float32 rounding of the group sums and
    # of the down pass, relative to the sizes of the terms
    gsum = (xs.abs() @ g.double().abs().T).max().item() + (xs.abs() @ u.double().abs().T).max().item()
    bound = 1e-4 * (hh @ dt.double().abs()) + 1e-5 * gsum * (dt.double().abs().sum(0).max().item()) + 1e-6
    for y in both_kernels(qg, qu, qd, x, mask, path, n_threads, x_int8=True):
        assert y.dtype == torch.float32
        err = (y.double() - ref).abs()
        assert torch.all(err <= bound), f"{path}: max err {err.max().item():.3g}"


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("block", [None, 32, 64, 128])
def test_int8x_bitwise_independent_of_thread_count(path, block):
    qg, qu, qd, x = random_int8_mlp(301, 384, 4, block, outlier=30.0)
    idx = np.flatnonzero(np.random.default_rng(0).random(301) < 0.4)
    with isa.use(path):
        ys = [_fast.IndexedMLP(qg, qu, qd, "silu", t, x_int8=True)(x, idx) for t in (1, 2, 3)]
    assert torch.equal(ys[0], ys[1]) and torch.equal(ys[0], ys[2])


def test_int8x_differs_from_float_x_by_the_rounding_of_x():
    """x_int8 is a different model: close to float x, not equal (and what it computes is the
    float model over the dequantized x, checked above)."""
    qg, qu, qd, x = random_int8_mlp(64, 256, 7, 32, outlier=30.0)
    idx = np.arange(64)
    y8 = _fast.IndexedMLP(qg, qu, qd, "silu", x_int8=True)(x, idx)
    y32 = _fast.IndexedMLP(qg, qu, qd, "silu")(x, idx)
    assert not torch.equal(y8, y32)
    assert (y8 - y32).norm() < 0.05 * y32.norm()


def test_int8x_path_names_follow_the_isa():
    want = {"portable": "portable", "avx2": "vpmaddubsw"}
    for path in PATHS:
        with isa.use(path):
            got = _fast.info()["int8_dot"]
        if path in want:
            assert got == want[path]
        else:  # the avx512 paths: VNNI where the CPU has it
            assert got in ("vpdpbusd", "vpmaddubsw")


def test_int8x_errors():
    qg, qu, qd, x = random_int8_mlp(10, 64, 1, outlier=30.0)
    with pytest.raises(ValueError, match="x_int8=True needs int8 weights"):
        _fast.IndexedMLP(qg.dequantize(), qu.dequantize(), qd.dequantize(), "silu", x_int8=True)
    cache = _fast.WeightCache(qg.dequantize(), qu.dequantize(), down_t=qd.dequantize())
    cache.update(np.ones(10, bool))
    with pytest.raises(ValueError, match="x_int8=True needs int8 weights"):
        cache.forward(x, "silu", x_int8=True)
    with pytest.raises(ValueError, match="x_int8 must be True or False"):
        _fast.IndexedMLP(qg, qu, qd, "silu", x_int8="yes")
