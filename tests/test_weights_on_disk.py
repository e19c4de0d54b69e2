"""MLP weights on disk: the bundled weight file, kernels and cache reading it, the windowed
cache, and a sparsified model running from the file against the same model in RAM."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sparselab import _fast
from sparselab.runtime import sparsify
from sparselab.runtime.weight_file import MLPWeightFile, write_mlp_file
from sparselab.runtime.window import WindowedCache
from sparselab.testing import tiny

H, N, LAYERS, VOCAB = 64, 200, 3, 101
IDS = torch.tensor([[5, 17, 33, 2, 90, 41, 7], [8, 8, 60, 12, 3, 77, 19]])


def tiny_llama(seed: int = 0, **config):
    return tiny.tiny_llama(vocab_size=VOCAB, hidden_size=H, intermediate_size=N, num_layers=LAYERS,
                           seed=seed, max_position_embeddings=64, pad_token_id=0, **config)


def threshold_predictors(density=0.3, seed=2):
    """Real Predictors with a density policy, so decode takes the fused C selector."""
    from sparselab.masking.rules import TopK
    from sparselab.masking.thresholds import quantile_grid
    from sparselab.prediction import Policy, Predictors

    g = torch.Generator().manual_seed(seed)
    weights, calibration = {}, {}
    for i in range(LAYERS):
        first, second, bias = torch.randn(8, H, generator=g), torch.randn(N, 8, generator=g), torch.randn(N, generator=g)
        scores = torch.addmm(bias, torch.randn(256, H, generator=g) @ first.T, second.T)
        weights[i], calibration[i] = (first, second, bias), (quantile_grid(scores), quantile_grid(scores))
    return Predictors(weights, TopK(0.3), policy=Policy("density", density), calibration=calibration)


def mlp_outputs(model, layer, fn):
    """(input, output) of every call of layer ``layer``'s MLP while ``fn()`` runs."""
    calls = []
    hook = model.model.layers[layer].mlp.register_forward_hook(
        lambda m, i, o: calls.append((i[0].detach().clone(), o.detach().clone())))
    try:
        fn()
    finally:
        hook.remove()
    return calls


def generate(model, n=4):
    with torch.no_grad():
        return model.generate(IDS, attention_mask=torch.ones_like(IDS), max_new_tokens=n,
                              min_new_tokens=n, do_sample=False, pad_token_id=0)


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


@pytest.fixture()
def weight_path(tmp_path):
    return write_mlp_file(tiny_llama(), tmp_path / "tiny.mlpw")


# ----------------------------------------------------------------------------- the file

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_file_round_trip_is_bit_exact(tmp_path, dtype):
    model = tiny_llama().to(dtype)
    path = write_mlp_file(model, tmp_path / "m.mlpw")
    with MLPWeightFile(path) as wf:
        assert (wf.layers, wf.n_neurons, wf.hidden, wf.dtype) == (tuple(range(LAYERS)), N, H, dtype)
        assert path.stat().st_size == wf.data_offset + LAYERS * N * 3 * H * (4 if dtype == torch.float32 else 2)
        for i, layer in enumerate(model.model.layers):
            mlp = layer.mlp
            gate, up, down = wf.read_layer(i)
            assert torch.equal(gate, mlp.gate_proj.weight) and torch.equal(up, mlp.up_proj.weight)
            assert torch.equal(down, mlp.down_proj.weight)
            bundle = wf.layer(i)
            j = 123  # one neuron = one contiguous [3, H] record: gate row, up row, down column
            as_t = torch.from_numpy(np.array(bundle[j]))
            as_t = as_t.view(torch.int16).view(torch.bfloat16) if dtype == torch.bfloat16 else as_t
            assert torch.equal(as_t, torch.stack([mlp.gate_proj.weight[j], mlp.up_proj.weight[j],
                                                  mlp.down_proj.weight[:, j]]))
        wf.check_model(model)
        bundle = None  # release the views before closing


def test_truncated_wrong_and_foreign_files_raise_clear_errors(tmp_path, weight_path):
    data = weight_path.read_bytes()
    cut = tmp_path / "cut.mlpw"
    cut.write_bytes(data[:-100])
    with pytest.raises(ValueError, match="truncated"):
        MLPWeightFile(cut)
    bad = tmp_path / "bad.mlpw"
    bad.write_bytes(b"PK\3\4" + data[4:])
    with pytest.raises(ValueError, match="not a sparselab MLP weight file"):
        MLPWeightFile(bad)
    wf = MLPWeightFile(weight_path)
    other = tiny_llama(seed=1)  # same shapes, other weights
    with pytest.raises(ValueError, match="another model.*weights differ"):
        wf.check_model(other)
    with pytest.raises(ValueError, match="another model"):
        sparsify(other, mode="static", static_neurons={i: [0, 1] for i in range(LAYERS)},
                 weight_file=wf)
    assert other.model.layers[0].mlp.gate_proj.weight.shape == (N, H)  # untouched
    wider = tiny.tiny_llama(vocab_size=VOCAB, hidden_size=H, intermediate_size=N + 8,
                            num_layers=LAYERS, max_position_embeddings=64)
    with pytest.raises(ValueError, match=r"another model: it holds \[200, 64\]"):
        wf.check_model(wider)


# ----------------------------------------------------------------------------- kernels

def test_bundle_kernel_and_cache_equal_their_in_ram_counterparts_bit_for_bit(weight_path):
    model = tiny_llama()
    mlp = model.model.layers[1].mlp
    gate, up = mlp.gate_proj.weight.detach(), mlp.up_proj.weight.detach()
    down_t = mlp.down_proj.weight.detach().t().contiguous()
    wf = MLPWeightFile(weight_path)
    bundle = wf.layer(1)
    x = torch.randn(3, H, generator=torch.Generator().manual_seed(0))
    rng = np.random.default_rng(0)
    idx = rng.choice(N, 57, replace=False)
    assert torch.equal(_fast.BundleMLP(bundle, torch.float32, "silu")(x, idx),
                       _fast.IndexedMLP(gate, up, down_t, "silu")(x, idx))
    ram = _fast.WeightCache(gate, up, down_t=down_t)
    disk = _fast.WeightCache.from_bundle(bundle, torch.float32, headroom=0.25)  # the in-RAM growth
    exact = _fast.WeightCache.from_bundle(bundle, torch.float32)  # no spare rows
    peak = 0
    for _ in range(6):
        mask = rng.random(N) < 0.3
        assert ram.update(mask) == disk.update(mask)
        assert torch.equal(disk.forward(x, "silu"), ram.forward(x, "silu"))
        peak = max(peak, exact.update(mask).n_active)
        assert exact.capacity == peak  # grows to what it must hold, never beyond
        assert torch.equal(exact.forward(x, "silu"), ram.forward(x, "silu"))
    some = disk.order[::3].copy()
    torch.testing.assert_close(disk.forward_neurons(x, some, "silu"),
                               _fast.sparse_mlp(x, gate, up, down_t, some, "silu"), rtol=1e-5, atol=1e-6)
    missing = np.setdiff1d(np.arange(N), disk.order)[:1]
    with pytest.raises(ValueError, match="not in the cache"):
        disk.forward_neurons(x, missing, "silu")


# ----------------------------------------------------------------------------- window

def test_windowed_cache_holds_the_last_k_masks_hand_example():
    """N = 6, k = 2. Masks {0,1}, {1,2}, {3}, {3}, {0,5}: the window's union is
    {0,1}, {0,1,2}, {1,2,3}, {3}, {0,3,5}; rows loaded 2, 1, 1, 0, 2; evicted 0, 0, 1, 2, 0."""
    g = torch.Generator().manual_seed(0)
    gate, up, down_t = (torch.randn(6, 8, generator=g) for _ in range(3))
    wc = WindowedCache(_fast.WeightCache(gate, up, down_t=down_t), window=2)
    steps = [{0, 1}, {1, 2}, {3}, {3}, {0, 5}]
    held = [{0, 1}, {0, 1, 2}, {1, 2, 3}, {3}, {0, 3, 5}]
    loaded, evicted = [2, 1, 1, 0, 2], [0, 0, 1, 2, 0]
    x = torch.randn(2, 8, generator=g)
    for t, on in enumerate(steps):
        mask = np.zeros(6, dtype=bool)
        mask[list(on)] = True
        s = wc.update(mask)
        assert (s.added, s.removed, wc.n_active) == (loaded[t], evicted[t], len(held[t]))
        assert set(wc.cache.order.tolist()) == held[t]
        idx = np.array(sorted(on))
        torch.testing.assert_close(wc(x, "silu"), _fast.sparse_mlp(x, gate, up, down_t, idx, "silu"),
                                   rtol=1e-5, atol=1e-6)


def test_windowed_cache_loads_what_window_reuse_counts():
    """Rows loaded per step == sl.metrics.window_reuse's new_per_token (independent code)."""
    import sparselab as sl

    rng = np.random.default_rng(3)
    n, steps, k = 150, 40, 4
    masks = rng.random((steps, n)) < 0.2
    g = torch.Generator().manual_seed(0)
    w = [torch.randn(n, 8, generator=g) for _ in range(3)]
    wc = WindowedCache(_fast.WeightCache(w[0], w[1], down_t=w[2]), window=k)
    loads, held = [], []
    for m in masks:
        loads.append(wc.update(m).added)
        held.append(wc.n_active)
    bits = sl.Masks(_fast.pack(masks)[None], n, (0,), np.zeros(steps, np.int64), np.arange(steps))
    df = sl.metrics.window_reuse(bits, windows=[k])
    assert np.isclose(df.new_per_token.iloc[0], np.mean(loads[k:]))
    assert np.isclose(df.footprint.iloc[0] * n, np.mean(held[k:]))


def _bounded_reference(masks: list[set], k: int, limit: int):
    """The capacity-bounded window in plain Python sets: (held, overflow) per step."""
    held_prev: set = set()
    out = []
    for t, cur in enumerate(masks):
        if len(cur) > limit:
            ordered = [j for j in sorted(cur) if j in held_prev] + [j for j in sorted(cur) if j not in held_prev]
            held = set(ordered[:limit])
        else:
            held = set(cur)
            for prev in reversed(masks[max(0, t - k + 1):t]):
                room = limit - len(held)
                extra = sorted(prev - held)
                extra = ([j for j in extra if j in held_prev] + [j for j in extra if j not in held_prev])[:room]
                held |= set(extra)
        out.append((held, cur - held))
        held_prev = held
    return out


@pytest.mark.parametrize("k,limit", [(1, 40), (3, 60), (4, 200)])
def test_bounded_window_cache_against_a_reference(k, limit):
    """capacity= never holds more rows than the limit, holds what the set-based reference
    holds, never reallocates its pre-sized buffers, and computes exactly each step's set
    (the part beyond the limit through the overflow kernel)."""
    rng = np.random.default_rng(k)
    g = torch.Generator().manual_seed(k)
    gate, up, down_t = (torch.randn(N, H, generator=g) for _ in range(3))
    cache = _fast.WeightCache(gate, up, down_t=down_t, capacity=limit)
    ptr = cache._gu.data_ptr()
    wc = WindowedCache(cache, window=k, capacity=limit, overflow=_fast.IndexedMLP(gate, up, down_t, "silu"))
    masks = [rng.random(N) < d for d in rng.uniform(0.1, 0.35, 30)]
    ref = _bounded_reference([set(np.flatnonzero(m).tolist()) for m in masks], k, limit)
    x = torch.randn(2, H, generator=g)
    overflow = 0
    for m, (held, over) in zip(masks, ref, strict=True):
        s = wc.update(m)
        assert set(cache.order.tolist()) == held and wc.n_active <= limit
        assert s.overflow == len(over)
        overflow += len(over)
        torch.testing.assert_close(wc(x, "silu"),
                                   _fast.sparse_mlp(x, gate, up, down_t, np.flatnonzero(m), "silu"),
                                   rtol=1e-4, atol=1e-4)  # another summation order
    assert cache.capacity == limit and cache.totals["grows"] == 0 and cache._gu.data_ptr() == ptr
    assert wc.overflow_rows == overflow and (overflow == 0) == (limit == N)
    bad = _fast.pack(np.ones(N, dtype=bool))
    bad[-1] |= np.uint64(1) << np.uint64(63)  # a bit past N = 200
    with pytest.raises(ValueError, match="beyond n_neurons"):
        wc.update(bad)
    with pytest.raises(ValueError, match="overflow"):
        WindowedCache(cache, window=2, capacity=10)
    with pytest.raises(ValueError, match="exceeds"):
        WindowedCache(cache, window=2, capacity=N + 1, overflow=wc.overflow)


def test_presized_cache_never_reallocates(weight_path):
    """A cache allocated at its capacity keeps its buffers for every mask that fits (no
    growth, the same memory), and grows only past it."""
    bundle = MLPWeightFile(weight_path).layer(0)
    cache = _fast.WeightCache.from_bundle(bundle, torch.float32, capacity=80)
    ptrs = (cache._gu.data_ptr(), cache._dt.data_ptr())
    rng = np.random.default_rng(1)
    for _ in range(20):
        mask = np.zeros(N, dtype=bool)
        mask[rng.choice(N, rng.integers(0, 81), replace=False)] = True
        assert not cache.update(mask).grew
        assert (cache.capacity, cache._gu.data_ptr(), cache._dt.data_ptr()) == (80, *ptrs)
    assert cache.totals["grows"] == 0 and cache.extra_bytes == 80 * 3 * H * 4
    assert cache.update(np.ones(N, dtype=bool)).grew and cache.capacity == N


# ----------------------------------------------------------------------------- model

@pytest.mark.parametrize("use_cache,window", [(True, 1), (False, 1), (True, 3)])
def test_model_from_disk_equals_the_in_ram_sparse_model(weight_path, use_cache, window):
    pred = threshold_predictors()
    kwargs = dict(mode="predicted", use_cache=use_cache, prefill="union", cache_window=window)
    ram_model = tiny_llama()
    with sparsify(ram_model, pred, **kwargs):
        ram_calls = mlp_outputs(ram_model, 2, lambda: generate(ram_model))
    model = tiny_llama()
    dense = logits(model)
    wf = MLPWeightFile(weight_path)
    with sparsify(model, pred, weight_file=wf, **kwargs) as handle:
        assert all(model.model.layers[i].mlp.gate_proj.weight.numel() == 0 for i in range(LAYERS))
        assert all(model.model.layers[i].mlp.down_proj.weight.numel() == 0 for i in range(LAYERS))
        disk_calls = mlp_outputs(model, 2, lambda: generate(model))
        decode = handle.stats().query("phase == 'decode'")
        assert (decode.active > 0).all() and (decode.active < N).all()
    assert len(disk_calls) == len(ram_calls) == 4
    for (xr, yr), (xd, yd) in zip(ram_calls, disk_calls, strict=True):
        if window == 1:  # same rows in the same order: the same floating-point sums
            assert torch.equal(xd, xr) and torch.equal(yd, yr)
        else:  # a window orders the cache's slots differently: fp32 rounding only
            torch.testing.assert_close(yd, yr, rtol=1e-4, atol=1e-5)
    assert model.model.layers[0].mlp.gate_proj.weight.shape == (N, H)
    assert torch.equal(logits(model), dense)  # restored from the file, bit for bit


@pytest.mark.parametrize("window", [1, 3])
def test_capacity_bounded_model_from_disk_computes_the_same_sets(weight_path, window):
    """cache_capacity below the density: each layer's cache holds at most ceil(share * N)
    rows in buffers allocated once, the rest of a step's set is read from the file, and
    the MLP outputs are the in-RAM sparse model's (fp32 rounding only)."""
    pred = threshold_predictors()
    kwargs = dict(mode="predicted", prefill="union")
    ram_model = tiny_llama()
    with sparsify(ram_model, pred, use_cache=False, **kwargs):
        ram_calls = mlp_outputs(ram_model, 2, lambda: generate(ram_model))
    model = tiny_llama()
    with sparsify(model, pred, weight_file=weight_path, cache_window=window, cache_capacity=0.2,
                  **kwargs) as handle:
        disk_calls = mlp_outputs(model, 2, lambda: generate(model))
        caches = handle.caches
        assert all(c.limit == 40 and c.cache.capacity == 40 and c.cache.totals["grows"] == 0
                   for c in caches.values())
        assert sum(c.overflow_rows for c in caches.values()) > 0  # density 0.3 > 0.2
        assert handle.config["cache_capacity"] == 0.2 and handle.config["cache_window"] == window
    assert len(disk_calls) == len(ram_calls) == 4
    for (xr, yr), (xd, yd) in zip(ram_calls, disk_calls, strict=True):
        torch.testing.assert_close(xd, xr, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(yd, yr, rtol=1e-4, atol=1e-5)


def test_dense_from_disk_and_bad_options(weight_path):
    model = tiny_llama()
    dense = logits(model)
    every = {i: np.arange(N) for i in range(LAYERS)}
    with sparsify(model, mode="static", static_neurons=every, weight_file=weight_path):
        torch.testing.assert_close(logits(model), dense, rtol=1e-4, atol=1e-5)
    assert torch.equal(logits(model), dense)
    for kwargs in ({"mode": "oracle", "density": 0.5}, {"mode": "static", "static_neurons": every,
                                                        "prefill": "per_token"}):
        with pytest.raises(ValueError, match="weight_file"):
            sparsify(model, weight_file=weight_path, **kwargs)
    with pytest.raises(ValueError, match="cache_window"):
        sparsify(model, threshold_predictors(), cache_window=0)
    # the default window: 1 in RAM (unchanged), 4 for a cache filled from the file
    with sparsify(model, threshold_predictors()) as h:
        assert h.config["cache_window"] == 1 and not hasattr(h.caches[0], "window")
    with sparsify(model, threshold_predictors(), weight_file=weight_path) as h:
        assert h.config["cache_window"] == 4 and h.caches[0].window == 4
    for kwargs in ({"cache_capacity": 0.5}, {"cache_capacity": 0.5, "use_cache": False, "weight_file": weight_path},
                   {"cache_capacity": 1.5, "weight_file": weight_path}, {"cache_capacity": True, "weight_file": weight_path}):
        with pytest.raises(ValueError, match="cache_capacity"):
            sparsify(model, threshold_predictors(), **kwargs)
    assert torch.equal(logits(model), dense)


# ----------------------------------------------------------------------------- measurement

def test_mincore_and_io_counters_see_what_a_kernel_reads(weight_path):
    """After drop_pages nothing is resident; the by-index kernel over 1 neuron in 10 of one
    layer makes exactly the pages of those neurons' records resident, and (on a block
    device) /proc/self/io counts them as read from storage."""
    import mmap

    from sparselab.evaluation.storage import StorageCounter

    wf = MLPWeightFile(weight_path)
    wf.drop_pages()
    if wf.resident_bytes():
        pytest.skip("the file's pages cannot be dropped here (tmpfs?)")
    idx = np.arange(0, N, 10)
    with StorageCounter() as io:
        _fast.BundleMLP(wf.layer(1), torch.float32, "silu")(torch.randn(1, H), idx)
    record = 3 * H * 4
    start = wf.data_offset + wf.layer_bytes * 1 + idx * record  # byte offsets in the file
    pages = set()
    for s in start:
        pages.update(range(s // mmap.PAGESIZE, (s + record - 1) // mmap.PAGESIZE + 1))
    vec = wf.resident_pages() & 1
    touched = {p + wf.data_offset // mmap.PAGESIZE for p in np.flatnonzero(vec)}
    assert touched == pages  # random advice: no read-ahead beyond the records touched
    assert io.read_bytes in (0, len(pages) * mmap.PAGESIZE)  # 0 only where the fs has no block device
    wf.drop_pages()
    assert wf.resident_bytes() == 0


def test_memory_footprint_counts_weight_pages_once(weight_path):
    """memory_footprint: the weight file's pages a kernel maps are in the RSS and in the
    resident count, and ``total`` counts them once; unmapped (madvise) they leave the RSS
    and stay resident in the page cache, and ``total`` does not change; an anonymous
    allocation shows in ``anon``."""
    import mmap

    from sparselab.evaluation.storage import memory_footprint

    wf = MLPWeightFile(weight_path)
    wf.drop_pages()
    if wf.resident_bytes():
        pytest.skip("the file's pages cannot be dropped here (tmpfs?)")
    _fast.BundleMLP(wf.layer(1), torch.float32, "silu")(torch.randn(1, H), np.arange(N))
    f = memory_footprint(wf)
    lo = wf.data_offset + wf.layer_bytes  # layer 1's bytes in the file: the pages they span
    pages = ((lo + wf.layer_bytes - 1) // mmap.PAGESIZE - lo // mmap.PAGESIZE + 1) * mmap.PAGESIZE
    assert f["weight_mapped"] == f["weight_resident"] == pages
    assert f["total"] == f["rss"] - f["weight_mapped"] + f["weight_resident"]
    wf._mm.madvise(mmap.MADV_DONTNEED)  # unmapped: the pages stay in the page cache
    g = memory_footprint(wf)
    assert g["weight_mapped"] == 0 and g["weight_resident"] == pages
    # the process's other memory drifts by a few MB between two readings (allocator, import
    # caches), far more than these few pages: compare the accounting, not the RSS difference
    assert g["total"] == g["rss"] - g["weight_mapped"] + g["weight_resident"]
    assert abs(g["total"] - f["total"]) < 4 * 2**20
    block = np.ones(32 * 2**20 // 8)
    assert memory_footprint()["anon"] >= g["anon"] + 31 * 2**20 and memory_footprint()["weight_resident"] == 0
    del block
    wf.drop_pages()


def test_memory_cap_kills_a_child_over_it_and_lets_one_under_it_run():
    import subprocess
    import sys

    from sparselab.evaluation.cgroup import CgroupUnavailable, MemoryCap

    try:
        cap = MemoryCap(64 * 2**20)
    except CgroupUnavailable as err:
        pytest.skip(str(err))
    with cap:
        code = "import numpy as np; a = np.ones({} * 2**20 // 8); print('ok')"
        over = subprocess.run([sys.executable, "-c", code.format(160)], preexec_fn=cap.preexec,
                              capture_output=True, text=True)
        assert over.returncode == -9 and cap.failcnt > 0
        cap.set_limit(400 * 2**20)
        under = subprocess.run([sys.executable, "-c", code.format(160)], preexec_fn=cap.preexec,
                               capture_output=True, text=True)
        assert under.returncode == 0 and under.stdout.strip() == "ok"
        assert cap.peak >= 160 * 2**20
    assert not cap.path.exists()
    with pytest.raises(ValueError, match="limit_bytes"):
        MemoryCap(10)


def test_make_resident_copies_file_mapped_weights_out_of_the_mapping(tmp_path):
    """Weights loaded from safetensors live in the file's mapping (evictable page cache);
    make_resident copies exactly those into anonymous memory, values and ties unchanged."""
    from transformers import AutoModelForCausalLM

    from sparselab.runtime.weight_file import _file_mappings, make_resident

    tiny_llama(tie_word_embeddings=True).save_pretrained(tmp_path / "m")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)

    def in_mapping():
        maps = _file_mappings()
        return [p for p in model.parameters()
                if any(a <= p.data_ptr() < b for a, b in maps)]

    mapped = in_mapping()
    if not mapped:
        pytest.skip("transformers did not memory-map the safetensors file here")
    before = logits(model)
    assert make_resident(model) == sum(p.numel() * p.element_size() for p in mapped)
    assert in_mapping() == []
    assert torch.equal(logits(model), before)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert make_resident(model) == 0


# ------------------------------------------------------ synthetic masks, bench_disk --shapes 3b

def test_synthetic_masks_keep_k_per_token_repeat_after_reset_and_reuse_like_measured():
    from sparselab.prediction import MaskPredictor, SyntheticActivationMasks

    n, d = 4096, 0.45
    p = SyntheticActivationMasks(n, 16, layers=[0, 3], density=d, seed=1)
    assert isinstance(p, MaskPredictor) and p.low_rank_form(0) is None and p.bytes == 0
    m = p.mask(3, torch.zeros(60, 16))
    assert m.shape == (60, n) and m.dtype == torch.bool
    assert (m.sum(1) == round(d * n)).all()
    p.reset()
    assert torch.equal(p.mask(3, torch.zeros(2, 30, 16)).reshape(60, n), m)  # any leading shape
    assert not torch.equal(p.mask(0, torch.zeros(60, 16)), m)  # layers differ
    # churn: the share of a token's neurons its predecessor did not use (fitted: ~0.39 at
    # d = 0.45, against 1 - d = 0.55 for independent masks)
    new = (m[1:] & ~m[:-1]).sum(1).float() / m[1:].sum(1)
    assert 0.33 < float(new.mean()) < 0.45
    # a window of k tokens loads fewer new neurons the longer it is (k = 1: below independent
    # masks' d (1 - d); longer windows approach them, as SmolLM2's trained predictors do)
    def new_per_token(k):
        return float(np.mean([(m[t] & ~m[t - k:t].any(0)).float().mean() for t in range(16, 60)]))
    rates = [new_per_token(k) for k in (1, 2, 4, 8, 16)]
    assert all(a > b for a, b in zip(rates, rates[1:], strict=False))
    assert rates[0] < 0.85 * d * (1 - d) and 0.03 < rates[2] < 0.07 and rates[4] < 0.01
    q = p.at_density(0.1)
    assert (q.mask(0, torch.zeros(3, 16)).sum(1) == round(0.1 * n)).all()
    p.reset()
    first = p.mask(0, torch.zeros(1, 16))
    assert torch.equal(p.at_density(d).mask(0, torch.zeros(1, 16)), first)  # a restarted copy
    assert q.describe()["kind"] == "synthetic_activation"
    with pytest.raises(ValueError, match="no synthetic masks for layer 1"):
        p.mask(1, torch.zeros(1, 16))
    with pytest.raises(ValueError, match="features"):
        p.mask(0, torch.zeros(1, 15))
    with pytest.raises(ValueError, match="rho"):
        SyntheticActivationMasks(n, 16, [0], rho=1.0)


def test_synthetic_masks_with_a_predictor_cost_drive_the_model_from_disk(weight_path):
    """sparsify(weight_file=) with synthetic masks: the direct kernel and the bounded cache
    (k = 1 and 4) compute each token over exactly the masks' neurons (the same outputs)."""
    from sparselab.prediction import RandomLowRankPredictors, SyntheticActivationMasks

    cost = RandomLowRankPredictors(hidden=H, n_neurons=N, layers=range(LAYERS), rank=8)
    outs = {}
    for name, kw in {"direct": dict(use_cache=False), "cache1": dict(use_cache=True, cache_window=1),
                     "cache4": dict(use_cache=True, cache_window=4, cache_capacity=0.4)}.items():
        pred = SyntheticActivationMasks(N, H, range(LAYERS), density=0.3, cost=cost)
        assert pred.bytes == cost.bytes
        model = tiny_llama()
        with sparsify(model, pred, mode="predicted", prefill="union", weight_file=MLPWeightFile(weight_path),
                      **kw) as handle:
            calls = mlp_outputs(model, 1, lambda m=model: generate(m, n=6))
            decode = handle.stats().query("phase == 'decode'")
            # two sequences: the union of two masks of 60 neurons each
            assert ((decode.active >= round(0.3 * N)) & (decode.active <= 2 * round(0.3 * N))).all()
        outs[name] = calls
    for other in ("cache1", "cache4"):
        for (_, ya), (_, yb) in zip(outs["direct"], outs[other], strict=True):
            torch.testing.assert_close(yb, ya, rtol=1e-4, atol=1e-5)


def _bench_disk():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "experiments" / "bench_disk.py"
    spec = importlib.util.spec_from_file_location("bench_disk", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_disk_3b_runs_and_predictors():
    import argparse

    bd = _bench_disk()
    args = argparse.Namespace(shapes="3b", densities=[0.3, 0.5], caps=[0.5], cache_windows=[1, 4],
                              cache_fill=0.75, windows=[1, 2, 4, 8, 16], window_caps=[0.5, None])
    runs = bd.runs_for(args)
    got = [(r["variant"], r["density"], r["cap"], r["window"], r.get("capacity")) for r in runs]
    assert got == [("dense", 1.0, 0.5, 1, None),
                   ("direct", 0.3, 0.5, 1, None), ("cache", 0.3, 0.5, 1, 0.375), ("cache", 0.3, 0.5, 4, 0.375),
                   ("direct", 0.5, 0.5, 1, None), ("cache", 0.5, 0.5, 1, 0.375), ("cache", 0.5, 0.5, 4, 0.375),
                   ("dense_ram", 1.0, None, 1, None)]
    # SmolLM2's sweep is unchanged by the new option (cache windows = [1] at each cap)
    smol = bd.runs_for(argparse.Namespace(shapes="smollm2", densities=[0.3, 0.5], caps=[0.5, None, 0.35],
                                          cache_windows=[1], cache_fill=0.75, windows=[1, 2, 4, 8, 16],
                                          window_caps=[0.5, None]))
    assert len(smol) == 5 + 3 + 8 + 5 + 5
    from sparselab.evaluation.suite import load_config

    config = load_config(bd.CONFIG_3B)
    p = bd.predictors_3b(config, 1, 0.5)
    assert (p.n_neurons, p.hidden_size, p.layers, p.k) == (8192, 3072, (0,), 4096)
    assert p.cost.rank == 327 and p.bytes == p.cost.bytes
