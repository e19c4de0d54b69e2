"""Resident memory of this process: now, at its peak during a block, and after freeing.

    >>> with MemorySampler(interval=0.002) as mem:
    ...     run()
    >>> mem.peak_rss, mem.kernel_peak_rss
"""

from __future__ import annotations

import gc
import threading
from contextlib import AbstractContextManager
from pathlib import Path

from sparselab._heap import trim_heap

MB = 2**20


# --------------------------------------------------------------------------------------
# memory
# --------------------------------------------------------------------------------------


def _psutil():
    try:
        import psutil
    except ImportError as err:  # pragma: no cover - psutil ships with ipykernel
        raise ImportError("sparselab.evaluation needs psutil to read the resident memory: "
                          "pip install psutil") from err
    return psutil


def rss_bytes() -> int:
    """Resident memory of this process now, in bytes (psutil)."""
    return int(_psutil().Process().memory_info().rss)


_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc ``malloc_trim``), so
    the RSS that follows shows what is held, not what a previous run once allocated."""
    gc.collect()
    trim_heap()


def _reset_kernel_peak() -> bool:
    """Reset the kernel's peak-RSS counter (Linux: write 5 to clear_refs); False if not allowed."""
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def _kernel_peak() -> int | None:
    """The kernel's peak RSS (``VmHWM``) in bytes, or None where /proc has none."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class MemorySampler(AbstractContextManager):
    """Peak resident memory of this process while a block runs (a background thread).

        >>> with MemorySampler(interval=0.002) as mem:
        ...     x = torch.ones(50_000_000)
        >>> (mem.peak_rss - mem.start_rss) / 2**20                # ~190 MiB

    The thread reads the RSS with psutil every ``interval`` seconds (plus once at entry
    and exit), so a spike shorter than ``interval`` can be missed; on Linux the kernel's
    own high-water mark is reset at entry and read at exit as ``kernel_peak_rss`` (None
    elsewhere), which misses nothing.
    """

    def __init__(self, interval: float = 0.002) -> None:
        if not interval > 0:
            raise ValueError(f"interval must be > 0 seconds, got {interval}")
        self.interval = float(interval)
        self.start_rss = self.end_rss = self.peak_rss = 0
        self.kernel_peak_rss: int | None = None
        self.n_samples = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._kernel = False

    def _run(self, process) -> None:
        peak, n = self.peak_rss, 0
        while not self._stop.wait(self.interval):
            rss = process.memory_info().rss
            n += 1
            if rss > peak:
                peak = rss
        self.peak_rss, self.n_samples = max(self.peak_rss, peak), self.n_samples + n

    def __enter__(self) -> MemorySampler:
        if self._thread is not None:
            raise RuntimeError("a MemorySampler measures one block; make a new one")
        process = _psutil().Process()
        self._kernel = _reset_kernel_peak()
        self.start_rss = self.peak_rss = int(process.memory_info().rss)
        self._thread = threading.Thread(target=self._run, args=(process,), daemon=True,
                                        name="sparselab-memory-sampler")
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.end_rss = rss_bytes()
        self.peak_rss = max(self.peak_rss, self.end_rss)
        self.n_samples += 2
        if self._kernel:
            self.kernel_peak_rss = _kernel_peak()
