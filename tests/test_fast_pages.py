"""``sparselab._fast.pages``: huge-page advice for weight memory never changes contents, never
raises for want of support, and on a Linux box with THP the range ends in huge pages; the
by-index kernel gives the same bits on collapsed weights.

    pytest tests/test_fast_pages.py
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sparselab import _fast
from sparselab._fast import pages
from sparselab._fast.pages import (
    aligned_interior,
    byte_span,
    merged,
    resident_huge_bytes,
    use_huge_pages,
)
from sparselab._fast.quant import quantize_int8

MIB = 1 << 20
THP = Path("/sys/kernel/mm/transparent_hugepage")


def big(mib: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randn(mib * MIB // 4, generator=torch.Generator().manual_seed(seed))


def test_aligned_interior():
    page = 2 * MIB
    assert aligned_interior(0, 4 * MIB, page) == (0, 4 * MIB)
    assert aligned_interior(1, 4 * MIB, page) == (page, page)  # the first and last part pages drop
    assert aligned_interior(1, 2 * MIB, page)[1] == 0
    assert aligned_interior(3 * MIB, MIB, page)[1] == 0


def test_merged():
    assert merged([(10, 5), (0, 4), (4, 2), (30, 0), (12, 10)]) == [(0, 6), (10, 12)]
    assert merged([]) == []


def test_byte_span():
    t = torch.zeros(4, 6)
    assert byte_span(t) == (t.data_ptr(), 96)
    v = t[1:3, ::2]  # rows 1-2, every other column: from (1, 0) to (2, 4)
    assert byte_span(v) == (t.data_ptr() + 24, (6 + 4 + 1) * 4)
    assert byte_span(torch.zeros(0, 3))[1] == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
def test_contents_unchanged(dtype):
    t = (big() * 40).to(dtype)
    before = t.clone()
    use_huge_pages(t)
    assert torch.equal(t.view(torch.uint8) if dtype != torch.int8 else t,
                       before.view(torch.uint8) if dtype != torch.int8 else before)


def test_small_tensor_counts_zero():
    assert use_huge_pages(torch.randn(1000)) == 0
    assert use_huge_pages() == 0
    assert use_huge_pages(torch.zeros(0)) == 0


def test_switched_off(monkeypatch):
    monkeypatch.setenv(pages.ENV_VAR, "0")
    assert not pages.enabled()
    assert use_huge_pages(big()) == 0


def test_unsupported_platform_counts_zero(monkeypatch):
    monkeypatch.setattr(pages, "_madvise", lambda: None)
    assert use_huge_pages(big()) == 0


def test_refused_advice_counts_zero(monkeypatch):
    """Every madvise failing (EINVAL, EAGAIN, ENOMEM alike return -1) counts 0, no raise."""
    calls = []

    def refuse(start, length, advice):
        calls.append(advice)
        return -1

    monkeypatch.setattr(pages, "_madvise", lambda: refuse)
    assert use_huge_pages(big()) == 0
    assert calls == [pages.MADV_HUGEPAGE]  # a refused MADV_HUGEPAGE skips the collapse


def test_non_contiguous_views():
    t = big().view(2048, -1)
    before = t.clone()
    for v in (t[:, ::2], t.t(), t[100:1900, 7:]):
        assert use_huge_pages(v) >= 0
    assert torch.equal(t, before)


def test_memory_mapped_file(tmp_path):
    path = tmp_path / "w.npy"
    np.save(path, np.arange(4 * MIB, dtype=np.float32))
    arr = np.load(path, mmap_mode="r+")
    t = torch.from_numpy(arr)
    assert use_huge_pages(t) >= 0  # the kernel decides; either way no exception
    assert torch.equal(t, torch.arange(4 * MIB, dtype=torch.float32))


def test_not_a_tensor():
    with pytest.raises(TypeError, match="argument 1 is ndarray"):
        use_huge_pages(torch.zeros(3), np.zeros(3))


def test_collapsed_range_shows_in_smaps():
    if not THP.exists():
        pytest.skip("no /sys/kernel/mm/transparent_hugepage")
    t = big()
    n = use_huge_pages(t)
    if n == 0:
        pytest.skip("the kernel did not collapse (THP never, or MADV_COLLAPSE unsupported)")
    start, length = aligned_interior(*byte_span(t), pages.huge_page_size())
    assert n == length >= 14 * MIB
    assert resident_huge_bytes(t) >= length


def test_unadvised_stays_small():
    """THP in madvise mode: a tensor nobody advised has no huge pages (the benchmark's 4 KiB
    side relies on it). In a fresh process: in this one, memory freed by earlier tests may
    come back from ranges they advised."""
    enabled = THP / "enabled"
    if not enabled.exists() or "[madvise]" not in enabled.read_text():
        pytest.skip("THP not in madvise mode")
    code = ("import torch; from sparselab._fast.pages import use_huge_pages, resident_huge_bytes; "
            "t = torch.randn(4 << 20); assert use_huge_pages(t) == 0; print(resident_huge_bytes(t))")
    env = {**os.environ, pages.ENV_VAR: "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, timeout=120)
    assert int(out.stdout.strip()) == 0


@pytest.mark.parametrize("fmt", ["float32", "bfloat16", "int8"])
def test_indexed_mlp_same_bits_on_huge_pages(fmt):
    """The by-index kernel over 16 MiB weights: collapsed or not, the same bits."""
    g = torch.Generator().manual_seed(1)
    n, h = 2048, 2048
    w = [torch.randn(n, h, generator=g) / h**0.5 for _ in range(3)]
    if fmt == "bfloat16":
        w = [m.to(torch.bfloat16) for m in w]
    x = torch.randn(2, h, generator=g).to(torch.bfloat16 if fmt == "bfloat16" else torch.float32)

    def weights():
        ws = [m.clone() for m in w]
        return [quantize_int8(m) for m in ws] if fmt == "int8" else ws

    idx = np.sort(np.random.default_rng(0).choice(n, n // 3, replace=False))
    for threads in (1, 2):
        small = _fast.IndexedMLP(*weights(), "silu", threads, huge_pages=False)
        huge = _fast.IndexedMLP(*weights(), "silu", threads)
        assert small.huge_page_bytes == 0
        y = small(x, idx)
        assert torch.equal(y, huge(x, idx))
        assert torch.equal(y, _fast.sparse_mlp(x, *weights(), idx, "silu", threads))


def test_weight_cache_buffers_on_huge_pages_same_bits(monkeypatch):
    """The cache advises its row buffers into 2 MiB pages when it allocates and grows them:
    the same bits as a cache built with the advice off, and (where the kernel collapses)
    huge pages under the buffers."""
    g = torch.Generator().manual_seed(2)
    n, h = 2048, 1024  # buffers of up to 16 MiB (gate/up) and 8 MiB (down)
    gate, up, down_t = (torch.randn(n, h, generator=g) / h**0.5 for _ in range(3))
    x = torch.randn(1, h, generator=g)
    masks = [np.random.default_rng(s).random(n) < d for s, d in ((0, 0.3), (1, 0.6), (2, 0.9))]
    monkeypatch.setenv(pages.ENV_VAR, "0")
    small = _fast.WeightCache(gate, up, down_t=down_t)
    monkeypatch.delenv(pages.ENV_VAR)
    huge = _fast.WeightCache(gate, up, down_t=down_t)
    capacities = []
    for m in masks:  # 0.3 -> 0.6 -> 0.9: the buffers grow twice
        with monkeypatch.context() as env:
            env.setenv(pages.ENV_VAR, "0")
            small.update(m)
        huge.update(m)
        capacities.append(huge.capacity)
        assert torch.equal(small.forward(x, "silu"), huge.forward(x, "silu"))
    assert capacities[0] < capacities[1] < capacities[2]
    if not THP.exists() or use_huge_pages(big()) == 0:
        pytest.skip("no huge pages here (THP off or MADV_COLLAPSE unsupported)")
    assert resident_huge_bytes(huge._gu, huge._dt) > 0
