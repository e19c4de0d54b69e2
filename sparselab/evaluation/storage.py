"""What a run really read from storage, and what it holds in RAM, from the kernel's counters.

    >>> with StorageCounter() as io:
    ...     model.generate(**batch, max_new_tokens=16)
    >>> io.read_bytes / 16                       # bytes read from the block device per token
    >>> wf.resident_bytes(), rss_bytes()         # weight pages in RAM (mincore), process RSS

``read_bytes`` in ``/proc/self/io`` counts what this process made the kernel fetch from the
block device: a page already in the page cache is *not* counted, so a cold measurement needs
the file's pages dropped first (:meth:`~sparselab.runtime.weight_file.MLPWeightFile.drop_pages`).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path

__all__ = ["StorageCounter", "io_counters", "io_read_bytes", "memory_footprint"]

_IO = Path("/proc/self/io")
_STATUS = Path("/proc/self/status")
_SMAPS = Path("/proc/self/smaps")


def _status_bytes() -> dict[str, int]:
    out = {}
    for line in _STATUS.read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
            out[key] = int(rest.split()[0]) * 1024
    return out


def _mapped_rss(path: Path) -> int:
    """Bytes of ``path``'s pages mapped into this process now (``Rss`` of its mappings in
    ``/proc/self/smaps``)."""
    target, total, inside = str(path), 0, False
    for line in _SMAPS.read_text().splitlines():
        first = line.split(maxsplit=1)[0]
        if "-" in first and not first.endswith(":"):  # a mapping's header line
            inside = line.rstrip().endswith(target)
        elif inside and first == "Rss:":
            total += int(line.split()[1]) * 1024
    return total


def memory_footprint(weight_file=None) -> dict[str, int]:
    """What this process holds in RAM now, with a weight file's pages counted once.

        >>> memory_footprint(wf)["total"]     # RSS - weight pages mapped + weight pages resident

    ``rss``/``anon``/``file``: ``/proc/self/status`` (VmRSS, RssAnon, RssFile+RssShmem);
    ``weight_mapped``: the weight file's pages in this process's page tables (already in
    ``rss``), ``weight_resident``: its pages in the page cache, mapped or not (``mincore``).
    ``total = rss - weight_mapped + weight_resident``: the process's memory plus the weight
    pages it keeps warm, none counted twice (page-cache pages of the file that another
    process mapped count too: they are what a run finds resident). Without a weight file,
    ``total`` is the RSS. Linux only.
    """
    st = _status_bytes()
    out = {"rss": st["VmRSS"], "anon": st["RssAnon"], "file": st["RssFile"] + st.get("RssShmem", 0),
           "weight_mapped": 0, "weight_resident": 0}
    if weight_file is not None:
        out["weight_mapped"] = _mapped_rss(weight_file.path.resolve())
        out["weight_resident"] = weight_file.resident_bytes()
    out["total"] = out["rss"] - out["weight_mapped"] + out["weight_resident"]
    return out


def io_counters() -> dict[str, int]:
    """This process's I/O counters (``/proc/self/io``): ``read_bytes`` (from storage),
    ``rchar`` (through read calls, cached or not), ... . ``RuntimeError`` where /proc has none."""
    try:
        text = _IO.read_text()
    except OSError as err:
        raise RuntimeError(f"no per-process I/O counters here ({_IO}: {err}); Linux only") from err
    return {k.strip(): int(v) for k, v in (line.split(":") for line in text.splitlines() if ":" in line)}


def io_read_bytes() -> int:
    """Bytes this process has had read from storage so far (page-cache hits excluded)."""
    return io_counters()["read_bytes"]


class StorageCounter(AbstractContextManager):
    """Bytes read from storage (``read_bytes``) and page faults while a block runs.

        >>> with StorageCounter() as io:
        ...     run()
        >>> io.read_bytes, io.major_faults

    Counts the whole process (every thread), which is what a decode step is here.
    """

    def __init__(self) -> None:
        self.read_bytes = 0
        self.major_faults = 0
        self._start: tuple[int, int] | None = None

    @staticmethod
    def _now() -> tuple[int, int]:
        import resource

        return io_read_bytes(), resource.getrusage(resource.RUSAGE_SELF).ru_majflt

    def __enter__(self) -> StorageCounter:
        self._start = self._now()
        return self

    def __exit__(self, *exc) -> None:
        end = self._now()
        self.read_bytes = end[0] - self._start[0]
        self.major_faults = end[1] - self._start[1]
