"""``sparselab._fast.WeightCache``: paired replacement keeps exactly the active rows, in the
order it reports, at a cost of the changed neurons only; bad input changes nothing.

    pytest tests/test_fast_cache.py
"""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparselab import _fast
from sparselab.testing.reference import dense_reference

SETTINGS = settings(deadline=None, max_examples=40)
DTYPES = [torch.float32, torch.bfloat16]
MASK_KINDS = ["empty", "full", "same", "disjoint", "random", "churn", "grow", "shrink"]


def make_weights(n_neurons, hidden, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    gate = torch.randn(n_neurons, hidden, generator=g).to(dtype)
    up = torch.randn(n_neurons, hidden, generator=g).to(dtype)
    down = torch.randn(hidden, n_neurons, generator=g).to(dtype)
    return gate, up, down


def next_mask(prev, kind, rng):
    n = prev.size
    if kind == "empty":
        return np.zeros(n, bool)
    if kind == "full":
        return np.ones(n, bool)
    if kind == "same":
        return prev.copy()
    if kind == "disjoint":
        return ~prev
    if kind == "churn":  # flip a few bits: the decode-time regime
        m = prev.copy()
        flip = rng.choice(n, size=min(n, int(rng.integers(1, 4))), replace=False)
        m[flip] = ~m[flip]
        return m
    if kind == "grow":
        return prev | (rng.random(n) < 0.3)
    if kind == "shrink":
        return prev & (rng.random(n) < 0.6)
    return rng.random(n) < rng.choice([0.05, 0.3, 0.7])


def bits16(t):
    """Compare bf16 bit patterns exactly (NaN-safe, no rounding)."""
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t.view(torch.int32)


def assert_cache_holds(cache, mask, gate, up, down):
    order = cache.order
    assert order.dtype == np.int64
    assert cache.n_active == int(mask.sum()) == order.size
    # order is a permutation of the active set
    np.testing.assert_array_equal(np.sort(order), np.flatnonzero(mask))
    np.testing.assert_array_equal(cache.mask, _fast.pack(mask))
    idx = torch.from_numpy(order.copy())
    assert torch.equal(bits16(cache.gate_up[:, 0]), bits16(gate[idx]))
    assert torch.equal(bits16(cache.gate_up[:, 1]), bits16(up[idx]))
    assert torch.equal(bits16(cache.gate), bits16(gate[idx]))
    assert torch.equal(bits16(cache.up), bits16(up[idx]))
    assert torch.equal(bits16(cache.down_t), bits16(down.t()[idx]))
    assert cache.gate_up.shape == (order.size, 2, cache.hidden)
    assert cache.down_t.shape == (order.size, cache.hidden)


def make_cache(gate, up, down, mode):
    if mode == "down_t":
        return _fast.WeightCache(gate, up, down_t=down.t().contiguous())
    return _fast.WeightCache(gate, up, down, down_mode=mode)


@SETTINGS
@given(
    n_neurons=st.sampled_from([1, 7, 63, 64, 65, 130, 200]),
    hidden=st.sampled_from([1, 33, 67, 130]),
    dtype=st.sampled_from(DTYPES),
    mode=st.sampled_from(["transpose", "columns", "down_t"]),
    kinds=st.lists(st.sampled_from(MASK_KINDS), min_size=1, max_size=8),
    seed=st.integers(0, 2**32 - 1),
)
def test_any_mask_sequence_keeps_exact_rows(n_neurons, hidden, dtype, mode, kinds, seed):
    rng = np.random.default_rng(seed)
    gate, up, down = make_weights(n_neurons, hidden, dtype, seed % 1000)
    cache = make_cache(gate, up, down, mode)
    prev = np.zeros(n_neurons, bool)
    max_active = 0
    rows_total = 0
    for i, kind in enumerate(kinds):
        mask = next_mask(prev, kind, rng)
        # alternate input forms: bool numpy, packed words, torch bool
        form = i % 3
        arg = mask if form == 0 else _fast.pack(mask) if form == 1 else torch.from_numpy(mask)
        stats = cache.update(arg)
        added, removed = np.flatnonzero(mask & ~prev), np.flatnonzero(prev & ~mask)
        assert (stats.added, stats.removed) == (added.size, removed.size)
        # cost is the changed neurons: every entering one, plus tail slots moved into holes,
        # and a hole only exists for a departure not paired with an arrival
        assert stats.rows_copied == added.size + stats.moved
        assert 0 <= stats.moved <= max(0, removed.size - added.size)
        assert stats.n_active == mask.sum()
        rows_total += stats.rows_copied
        assert_cache_holds(cache, mask, gate, up, down)
        # extra memory bounded: never more than twice the largest active set seen
        max_active = max(max_active, int(mask.sum()))
        assert cache.n_active <= cache.capacity <= min(n_neurons, max_active + max_active // 4)
        prev = mask
    totals = cache.totals
    assert totals["updates"] == len(kinds)
    assert totals["rows_copied"] == rows_total


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_active", [64, 300])
def test_fixed_churn_copies_the_same_rows_whatever_the_active_size(dtype, n_active):
    n, h, k = 512, 16, 5
    gate, up, down = make_weights(n, h, dtype)
    cache = _fast.WeightCache(gate, up, down)
    rng = np.random.default_rng(1)
    mask = np.zeros(n, bool)
    mask[rng.choice(n, n_active, replace=False)] = True
    cache.update(mask)
    # swap k neurons: k paired replacements, no tail moves, regardless of n_active
    swapped = mask.copy()
    swapped[rng.choice(np.flatnonzero(mask), k, replace=False)] = False
    swapped[rng.choice(np.flatnonzero(~mask), k, replace=False)] = True
    s = cache.update(swapped)
    assert (s.added, s.removed, s.rows_copied, s.moved) == (k, k, k, 0)
    assert s.bytes_moved == k * 3 * h * gate.element_size()
    # remove k: at most k tail moves
    fewer = swapped.copy()
    fewer[rng.choice(np.flatnonzero(swapped), k, replace=False)] = False
    s = cache.update(fewer)
    assert s.added == 0 and s.rows_copied == s.moved <= k
    # add k back: k appended rows, capacity already there, no growth
    s = cache.update(swapped)
    assert (s.rows_copied, s.moved, s.grew) == (k, 0, False)
    assert_cache_holds(cache, swapped, gate, up, down)


def test_extra_memory_is_the_slots_and_the_optional_transpose():
    n, h = 256, 40
    gate, up, down = make_weights(n, h, torch.float32)
    slot = 3 * h * 4
    mask = np.zeros(n, bool)
    mask[:100] = True
    c_t = _fast.WeightCache(gate, up, down_t=down.t().contiguous())
    c_c = _fast.WeightCache(gate, up, down, down_mode="columns")
    c_x = _fast.WeightCache(gate, up, down)
    for c in (c_t, c_c, c_x):
        c.update(mask)
        assert c.capacity == 100
    assert c_t.extra_bytes == c_c.extra_bytes == 100 * slot
    assert c_x.extra_bytes == 100 * slot + n * h * 4
    # explicit capacity is honoured and grown only when needed
    c = _fast.WeightCache(gate, up, down_t=down.t().contiguous(), capacity=120)
    assert c.update(mask).grew is False and c.capacity == 120
    assert c.update(np.ones(n, bool)).grew is True and c.capacity == n


def test_cache_reads_the_callers_weights_not_a_copy():
    gate, up, down = make_weights(70, 9, torch.float32)
    cache = _fast.WeightCache(gate, up, down_t=down.t().contiguous())
    with torch.no_grad():
        gate[5] = 42.0  # an in-place edit of the model's weight before neuron 5 enters
    m = np.zeros(70, bool)
    m[5] = True
    cache.update(m)
    assert torch.all(cache.gate_up[0, 0] == 42.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_views_share_memory_with_buffers(dtype):
    gate, up, down = make_weights(100, 33, dtype)
    cache = _fast.WeightCache(gate, up, down)
    m = np.zeros(100, bool)
    m[::3] = True
    cache.update(m)
    gu = cache.gate_up
    esize = gu.element_size()
    assert cache.gate.data_ptr() == gu.data_ptr()
    assert cache.up.data_ptr() == gu.data_ptr() + 33 * esize
    assert cache.gate_up.data_ptr() == gu.data_ptr()
    x = torch.randn(33).to(dtype)
    assert torch.any(cache.forward(x, "silu") != 0)
    # writing through the views is what the kernel then reads: no hidden copy anywhere
    cache.down_t.zero_()
    assert torch.all(cache.down_t == 0)
    assert torch.all(cache.forward(x, "silu") == 0)
    cache.up[0].fill_(7.0)
    assert torch.all(cache.gate_up[0, 1] == 7.0)


def test_empty_and_full_masks():
    gate, up, down = make_weights(65, 33, torch.float32)
    cache = _fast.WeightCache(gate, up, down)
    x = torch.randn(2, 33)
    s = cache.update(np.zeros(65, bool))
    assert s.n_active == 0 and cache.order.size == 0 and cache.capacity == 0
    assert torch.all(cache.forward(x, "silu") == 0)
    cache.update(np.ones(65, bool))
    assert_cache_holds(cache, np.ones(65, bool), gate, up, down)
    ref = dense_reference(x, gate, up, down, "silu")
    torch.testing.assert_close(cache.forward(x, "silu").double(), ref, rtol=1e-4, atol=1e-4)
    cache.update(np.zeros(65, bool))
    assert cache.n_active == 0 and torch.all(cache.forward(x, "relu") == 0)


def snapshot(cache):
    return (
        bits16(cache._gu).clone(), bits16(cache._dt).clone(), cache._order.copy(),
        cache.mask.copy(), cache._slot_of.copy(), cache.totals, cache.n_active, cache.capacity,
    )


def assert_same(a, b):
    assert len(a) == len(b)
    for u, v in zip(a, b, strict=True):
        if isinstance(u, torch.Tensor):
            assert torch.equal(u, v)
        elif isinstance(u, np.ndarray):
            np.testing.assert_array_equal(u, v)
        else:
            assert u == v


@pytest.mark.parametrize("dtype", DTYPES)
def test_bad_updates_raise_and_leave_the_cache_unchanged(dtype):
    n, h = 130, 17
    gate, up, down = make_weights(n, h, dtype)
    cache = _fast.WeightCache(gate, up, down)
    m = np.zeros(n, bool)
    m[::4] = True
    cache.update(m)
    before = snapshot(cache)
    words = _fast.pack(m)
    tail = words.copy()
    tail[-1] |= np.uint64(1) << np.uint64(63)  # neuron 191 does not exist
    bad = [
        (np.ones(n + 1, bool), "shape"),
        (np.ones((2, n), bool), "shape"),
        (np.ones(n, np.float32), "uint64"),
        (words.astype(np.int64), "uint64"),
        (np.zeros(words.size + 1, np.uint64), "words"),
        (tail, "beyond"),
        (torch.ones(n - 1, dtype=torch.bool), "shape"),
        ([True] * n, "numpy array or a torch tensor"),
    ]
    for arg, msg in bad:
        with pytest.raises(ValueError, match=msg):
            cache.update(arg)
        assert_same(before, snapshot(cache))
    with pytest.raises(ValueError, match="n_threads"):
        cache.update(~m, n_threads=0)
    assert_same(before, snapshot(cache))
    x = torch.randn(3, h).to(dtype)
    other = torch.float32 if dtype == torch.bfloat16 else torch.bfloat16
    for kwargs, msg in [
        (dict(x=x, activation="gelu"), "unknown activation"),
        (dict(x=x, activation="sigmoid"), "unknown activation"),
        (dict(x=x.to(other), activation="silu"), "dtype"),
        (dict(x=torch.randn(3, h + 1).to(dtype), activation="silu"), "hidden size"),
        (dict(x=torch.randn(2, 3, h).to(dtype), activation="silu"), "batch, hidden"),
        (dict(x=x, activation="silu", out_dtype=torch.float16), "out_dtype"),
    ]:
        with pytest.raises(ValueError, match=msg):
            cache.forward(**kwargs)
        assert_same(before, snapshot(cache))


def test_bad_construction_raises():
    gate, up, down = make_weights(64, 8, torch.float32)
    cases = [
        (lambda: _fast.WeightCache(gate, up[:, :7].contiguous(), down), "must match"),
        (lambda: _fast.WeightCache(gate, up.bfloat16(), down), "dtype"),
        (lambda: _fast.WeightCache(gate.half(), up.half(), down.half()), "dtype"),
        (lambda: _fast.WeightCache(gate, up, down.t()), "contiguous"),
        (lambda: _fast.WeightCache(gate[:, ::2], up[:, ::2], down[::2]), "contiguous"),
        (lambda: _fast.WeightCache(gate, up, down.t().contiguous()), "expected"),
        (lambda: _fast.WeightCache(gate, up), "exactly one"),
        (lambda: _fast.WeightCache(gate, up, down, down_t=down.t().contiguous()), "exactly one"),
        (lambda: _fast.WeightCache(gate, up, down_t=down), "expected"),
        (lambda: _fast.WeightCache(gate, up, down, down_mode="rows"), "down_mode"),
        (lambda: _fast.WeightCache(gate, up, down, capacity=65), "capacity"),
        (lambda: _fast.WeightCache(gate.numpy(), up, down), "torch tensor"),
        (lambda: _fast.WeightCache(gate[None], up, down), "2-D"),
    ]
    for make, msg in cases:
        with pytest.raises(ValueError, match=msg):
            make()


def test_weights_requiring_grad_are_accepted():
    lin_g, lin_u, lin_d = torch.nn.Linear(8, 70), torch.nn.Linear(8, 70), torch.nn.Linear(70, 8)
    cache = _fast.WeightCache(lin_g.weight, lin_u.weight, lin_d.weight)
    m = np.zeros(70, bool)
    m[[3, 60]] = True
    cache.update(m)
    assert_cache_holds(cache, m, lin_g.weight.detach(), lin_u.weight.detach(),
                       lin_d.weight.detach())
