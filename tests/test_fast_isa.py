"""Run-time instruction-set dispatch of ``sparselab._fast``: every code path this CPU runs,
forced one at a time, against a float64 reference (both kernels, fp32 and bf16, the fused
selector), bitwise thread-count independence per path, and the errors for paths the CPU
lacks.

    pytest tests/test_fast_isa.py
"""

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparselab import _fast
from sparselab._fast import isa
from sparselab.testing.reference import bf16_rounding_slack, dense_reference, term_scale

PATHS = isa.supported()
DTYPES = [torch.float32, torch.bfloat16]


def weights(n, h, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    s = 1.0 / math.sqrt(h)
    gate = (torch.randn(n, h, generator=g) * 2 * s).to(dtype)
    up = (torch.randn(n, h, generator=g) * s).to(dtype)
    down = (torch.randn(h, n, generator=g) * s).to(dtype)
    x = torch.randn(3, h, generator=g).to(dtype)
    return gate, up, down, x


def test_info_names_the_path_in_use_and_the_supported_ones():
    info = _fast.info()
    assert info["isa"] == isa.current() and info["isa"] in info["supported_isas"]
    assert info["supported_isas"][0] == "portable"
    # default: the best path the CPU supports (unless the environment forces one)
    if not os.environ.get(isa.ENV_VAR):
        assert info["isa"] == PATHS[-1]


def test_every_x86_cpu_with_avx2_gets_a_vector_path():
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    if " avx2" in flags and " fma" in flags:
        assert "avx2" in PATHS
    if " avx512_bf16" in flags:
        assert "avx512bf16" in PATHS


def test_forcing_a_path_the_cpu_lacks_or_an_unknown_one_raises_and_changes_nothing():
    before = isa.current()
    with pytest.raises(ValueError, match="expected one of"):
        isa.set_isa("sse9")
    missing = [p for p in isa.ISA_NAMES if p not in PATHS]
    for p in missing:
        with pytest.raises(ValueError, match="supports"):
            isa.set_isa(p)
    assert isa.current() == before


def test_env_var_forces_the_path_and_rejects_unknown_ones():
    code = "from sparselab import _fast; print(_fast.info()['isa'])"
    env = dict(os.environ, SPARSELAB_ISA="portable")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "portable", out.stderr
    env["SPARSELAB_ISA"] = "nonsense"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "SPARSELAB_ISA" in out.stderr


@pytest.mark.parametrize("path", PATHS)
def test_use_restores_the_previous_path(path):
    before = isa.current()
    with isa.use(path):
        assert isa.current() == path and _fast.info()["isa"] == path
    assert isa.current() == before


@settings(deadline=None, max_examples=40)
@given(path=st.sampled_from(PATHS), dtype=st.sampled_from(DTYPES),
       n=st.sampled_from([1, 3, 64, 129]), h=st.sampled_from([1, 15, 16, 17, 33, 100, 257]),
       batch=st.sampled_from([1, 3]), density=st.sampled_from([0.1, 0.5, 1.0]),
       n_threads=st.sampled_from([1, 2]), seed=st.integers(0, 10_000))
def test_each_path_matches_float64_reference(path, dtype, n, h, batch, density, n_threads, seed):
    gate, up, down, x = weights(n, h, dtype, seed)
    x = x[:batch]
    mask = np.random.default_rng(seed).random(n) < density
    # bf16 weights: every path rounds h to bf16 before the down pass, as a bf16 model does
    bf16 = dtype == torch.bfloat16
    ref = dense_reference(x, gate, up, down, "silu", mask_bool=mask, h_bf16=bf16)
    bound = 1e-4 * term_scale(x, gate, up, down, "silu", mask) + 1e-6
    if bf16:
        bound = bound + bf16_rounding_slack(x, gate, up, down, "silu", mask)
    with isa.use(path):
        cache = _fast.WeightCache(gate, up, down)
        cache.update(mask)
        y1 = cache.forward(x, "silu", n_threads=n_threads, out_dtype=torch.float32)
        y2 = _fast.sparse_mlp(x, gate, up, down.t().contiguous(), np.flatnonzero(mask), "silu",
                              n_threads=n_threads, out_dtype=torch.float32)
    for y in (y1, y2):
        err = (y.double() - ref).abs()
        assert torch.all(err <= bound), f"{path}: max err {err.max().item():.3g}"


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_each_path_is_bitwise_independent_of_thread_count(path, dtype):
    gate, up, down, x = weights(301, 259, dtype, 5)
    idx = np.arange(0, 301, 3)
    dt = down.t().contiguous()
    with isa.use(path):
        ys = [_fast.sparse_mlp(x, gate, up, dt, idx, "silu", n_threads=t) for t in (1, 2, 3)]
    assert torch.equal(ys[0], ys[1]) and torch.equal(ys[0], ys[2])


@pytest.mark.parametrize("path", PATHS)
def test_selector_scores_match_float64_on_each_path(path):
    g = torch.Generator().manual_seed(0)
    first, second = torch.randn(16, 70, generator=g), torch.randn(90, 16, generator=g)
    bias, x = torch.randn(90, generator=g), torch.randn(2, 70, generator=g)
    sel = _fast.LowRankSelector(first, second, bias)
    ref = (x.double() @ first.double().T) @ second.double().T + bias.double()
    with isa.use(path):
        s = sel._bound.scores(x.numpy(), 2)  # the compiled pass the threshold/top-k use
        idx, _ = sel(x, 0.0)
    assert torch.allclose(torch.as_tensor(s).double(), ref, rtol=1e-4, atol=1e-4)
    clear = (ref.abs() > 1e-3).all(0)  # neurons whose sign no rounding can flip
    want = (ref > 0).any(0)
    got = torch.zeros(90, dtype=torch.bool)
    got[torch.as_tensor(idx)] = True
    assert torch.equal(got[clear], want[clear])


@pytest.mark.parametrize("path", PATHS)
def test_bf16_weights_round_h_to_bf16_before_the_down_pass_on_every_path(path):
    # relu(gate . x) = 1 and up . x = 1 + 3 * 2**-9 (exact in fp32), so h = 1.005859375,
    # which bf16 (7 fraction bits, steps of 2**-7 near 1) rounds to 1 + 2**-7: a bf16 model
    # feeds its down projection 1.0078125, and so must the kernels
    bf = torch.bfloat16
    x = torch.tensor([[1.0, 1.0]], dtype=bf)
    gate = torch.tensor([[1.0, 0.0]], dtype=bf)
    up = torch.tensor([[1.0, 3 * 2.0**-9]], dtype=bf)
    down = torch.tensor([[1.0], [2.0]], dtype=bf)  # [H, I]
    want = torch.tensor([[1 + 2.0**-7, 2 + 2.0**-6]])
    with isa.use(path):
        y = _fast.sparse_mlp(x, gate, up, down.t().contiguous(), np.array([0]), "relu",
                             out_dtype=torch.float32)
        cache = _fast.WeightCache(gate, up, down)
        cache.update(np.array([True]))
        yc = cache.forward(x, "relu", out_dtype=torch.float32)
    assert torch.equal(y, want) and torch.equal(yc, want)


@pytest.mark.skipif("avx512bf16" not in PATHS, reason="no AVX512-BF16 on this CPU")
def test_bf16_down_pass_in_vdpbf16ps_matches_the_widening_loop():
    # the benchmark knob switches the avx512bf16 path's down pass between vdpbf16ps (two
    # rows per instruction, y in permuted column groups) and widening FMAs: the same model
    # (h rounded to bf16 in both), sums in another order, so equal to fp32 rounding; h = 259
    # leaves a partial column group and 3 threads split the output unevenly
    from sparselab._fast import _mlp

    gate, up, down, x = weights(301, 259, torch.bfloat16, 9)
    idx = np.arange(0, 301, 2)
    dt = down.t().contiguous()
    ys = {}
    with isa.use("avx512bf16"):
        try:
            for on in (0, 1):
                _mlp._set_bf16_down_dp(on)
                ys[on] = _fast.sparse_mlp(x, gate, up, dt, idx, "silu", n_threads=3,
                                          out_dtype=torch.float32)
        finally:
            _mlp._set_bf16_down_dp(1)
    mask = np.zeros(301, dtype=bool)
    mask[idx] = True
    bound = 1e-5 * term_scale(x, gate, up, down, "silu", mask) + 1e-7
    assert torch.all((ys[0] - ys[1]).abs().double() <= bound)
    assert not torch.equal(ys[0], ys[1])  # the knob does switch the loop
