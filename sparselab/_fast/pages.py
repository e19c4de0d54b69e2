"""Huge pages for weight memory: ask Linux to back weight tensors with 2 MiB pages.

    >>> from sparselab._fast.pages import use_huge_pages
    >>> use_huge_pages(gate_w, up_w, down_t)   # bytes now in 2 MiB pages; 0 where unsupported

Why: the by-index kernel (:class:`~sparselab._fast.kernels.IndexedMLP`) reads scattered
rows of gate, up and down_t. With 4 KiB pages nearly every row start is a new page and so
likely a TLB miss (a 3072-wide fp32 row is 12 KiB: three pages); one 2 MiB page covers
170 such rows. The weight cache (:class:`~sparselab._fast.cache.WeightCache`) reads its
row buffers in order, and the hardware prefetchers stop at every 4 KiB page boundary. On
Llama-3.2-3B MLP shapes (batch 1, 10-50 % density, 1 and 2 threads) 2 MiB pages made the
by-index kernel 0.99-1.20x as fast (fp32 1.06-1.13x, bf16 1.10-1.20x) and the cache
0.98-1.17x, bit for bit the same output: ``python experiments/bench_huge_pages.py``
(``experiments/results/bench_huge_pages.md``, a 2-core AMD EPYC).

How: for each CPU tensor, the 2 MiB-aligned interior of the memory it spans (the page
size is read from ``/sys/kernel/mm/transparent_hugepage/hpage_pmd_size``) is advised
``MADV_HUGEPAGE`` (later faults and khugepaged may use huge pages there), then
``MADV_COLLAPSE`` (Linux >= 6.1: collapse it now, synchronously; the kernel copies the
small pages into huge ones). The bytes at either end that do not fill a whole huge page
stay in small pages; a tensor smaller than one huge page after alignment is skipped.

It is advice: tensor contents never change, and nothing here raises because the platform
or kernel cannot do it (not Linux, THP ``never``, ``EINVAL``, ``EAGAIN``, ``ENOMEM``, no
sysfs): such ranges count 0. Memory-mapped files are advised the same way and the kernel
decides: it refuses a private file mapping (``EINVAL``), which is where a model loaded from
safetensors keeps its weights, so those stay in 4 KiB pages.

``SPARSELAB_HUGE_PAGES=0`` in the environment turns it off (read at each call), e.g. to
compare against 4 KiB pages:
``SPARSELAB_HUGE_PAGES=0 python experiments/run_benchmark.py --config experiments/configs/llama_skip_causal_3b.json``.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from pathlib import Path

import torch

__all__ = ["ENV_VAR", "enabled", "huge_page_size", "resident_huge_bytes", "use_huge_pages"]

ENV_VAR = "SPARSELAB_HUGE_PAGES"
MADV_HUGEPAGE = 14  # Linux's values (other systems number their advice differently)
MADV_COLLAPSE = 25
DEFAULT_PAGE = 2 << 20
PMD_SIZE_FILE = Path("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size")
SMAPS = Path("/proc/self/smaps")


def enabled() -> bool:
    """False when ``$SPARSELAB_HUGE_PAGES`` is ``0`` (anything else, or unset: on)."""
    return os.environ.get(ENV_VAR, "").strip() != "0"


@functools.cache
def huge_page_size() -> int:
    """The PMD huge page size in bytes (2 MiB on x86-64 and most arm64), or the default
    when sysfs does not say."""
    try:
        size = int(PMD_SIZE_FILE.read_text().strip())
    except (OSError, ValueError):
        return DEFAULT_PAGE
    # a page size is a power of two; anything else is a sysfs we do not understand
    return size if size > 0 and size & (size - 1) == 0 else DEFAULT_PAGE


@functools.cache
def _madvise():
    """libc's ``madvise`` on Linux, else None (the advice numbers above are Linux's)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def byte_span(t: torch.Tensor) -> tuple[int, int]:
    """(start address, length) of the bytes a strided CPU tensor's elements lie in; (0, 0)
    for a tensor with no elements. A non-contiguous view spans the gaps between its rows
    too (they belong to the same storage, so advising them is harmless)."""
    if t.numel() == 0:
        return 0, 0
    last = sum((n - 1) * s for n, s in zip(t.shape, t.stride(), strict=True))  # torch strides are >= 0
    return t.data_ptr(), (last + 1) * t.element_size()


def aligned_interior(start: int, length: int, page: int) -> tuple[int, int]:
    """The whole ``page``-aligned pages inside ``[start, start + length)``: (start, length),
    length 0 when none fits."""
    lo = (start + page - 1) // page * page
    hi = (start + length) // page * page
    return (lo, hi - lo) if hi > lo else (lo, 0)


def merged(ranges) -> list[tuple[int, int]]:
    """(start, length) ranges sorted and merged where they overlap or touch, so tied or
    overlapping tensors are advised (and counted) once."""
    out: list[list[int]] = []
    for start, length in sorted(r for r in ranges if r[1] > 0):
        if out and start <= out[-1][0] + out[-1][1]:
            out[-1][1] = max(out[-1][1], start + length - out[-1][0])
        else:
            out.append([start, length])
    return [(s, n) for s, n in out]


def _advise(madvise, start: int, length: int) -> bool:
    """MADV_HUGEPAGE then MADV_COLLAPSE on one aligned range: True when the collapse
    succeeded. A refused MADV_HUGEPAGE (THP off, a mapping that cannot have it) skips the
    collapse; a failed collapse (EAGAIN, ENOMEM, EINVAL before Linux 6.1) leaves the range
    as it was, still advised for khugepaged."""
    if madvise(start, length, MADV_HUGEPAGE) != 0:
        return False
    return madvise(start, length, MADV_COLLAPSE) == 0


def use_huge_pages(*tensors) -> int:
    """Advise the 2 MiB-aligned interior of each CPU tensor's memory into huge pages (see
    the module docstring): returns the bytes of the ranges the kernel collapsed, 0 when it
    is off (``SPARSELAB_HUGE_PAGES=0``), unsupported, or every tensor is too small.

    Tensors on other devices, sparse or without elements are skipped; anything that is not
    a tensor raises ``TypeError`` (that is the caller's bug, not the platform's).
    """
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"use_huge_pages: argument {i} is {type(t).__name__}, not a tensor")
    madvise = _madvise() if enabled() else None
    if madvise is None:
        return 0
    page = huge_page_size()
    spans = [byte_span(t) for t in tensors if t.device.type == "cpu" and t.layout == torch.strided]
    ranges = merged(aligned_interior(s, n, page) for s, n in spans)
    return sum(n for s, n in ranges if _advise(madvise, s, n))


def resident_huge_bytes(*tensors) -> int:
    """Bytes in anonymous huge pages (``AnonHugePages`` of ``/proc/self/smaps``) of the
    mappings the tensors' memory lies in; 0 where smaps cannot be read. Per mapping, not per
    byte: an advised range is its own mapping (``MADV_HUGEPAGE`` splits it off), so for the
    ranges :func:`use_huge_pages` collapsed it is exact. For checks and benchmarks."""
    spans = merged(byte_span(t) for t in tensors
                   if isinstance(t, torch.Tensor) and t.device.type == "cpu"
                   and t.layout == torch.strided)
    try:
        text = SMAPS.read_text()
    except OSError:
        return 0
    total, inside = 0, False
    for line in text.splitlines():
        head = line.split(maxsplit=1)[0] if line else ""
        if "-" in head and not head.endswith(":"):  # a mapping's header: "lo-hi perms ..."
            lo, hi = (int(v, 16) for v in head.split("-"))
            inside = any(lo < s + n and s < hi for s, n in spans)
        elif inside and line.startswith("AnonHugePages:"):
            total += int(line.split()[1]) * 1024  # smaps reports kB
    return total
