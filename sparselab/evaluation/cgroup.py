"""A memory cap for a process: a Linux memory cgroup, so the page cache cannot silently hold
a whole weight file and a run "from disk" really re-reads what it cannot keep.

    >>> with MemoryCap(400 * 2**20) as cap:          # a child of this process's own cgroup
    ...     cap.add(os.getpid())                        # or subprocess.Popen(..., cap.preexec)
    ...     run()
    ...     cap.usage, cap.peak, cap.failcnt

cgroup v1 (``memory.limit_in_bytes`` under ``/sys/fs/cgroup/memory``) and v2
(``memory.max``) are both handled; creating one needs write access to the hierarchy
(root, or a delegated subtree). Where there is none, :class:`CgroupUnavailable` says why
before anything is created. The cap counts everything the group charges: anonymous memory
(the process's heap, the resident model) and the page cache of files it reads.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

__all__ = ["CgroupUnavailable", "MemoryCap", "cgroup_version"]

_ROOT = Path("/sys/fs/cgroup")


class CgroupUnavailable(RuntimeError):
    """No writable memory cgroup on this machine (or not Linux)."""


def _own_path(controller_line_match) -> str | None:
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controller_line_match(controllers):
            return path
    return None


def cgroup_version() -> tuple[str, Path] | None:
    """``("v1", dir)`` or ``("v2", dir)``: the memory cgroup this process is in, whose
    children a cap is made of; None where there is no memory controller."""
    v1 = _ROOT / "memory"
    if (v1 / "memory.limit_in_bytes").exists():
        own = _own_path(lambda c: "memory" in c.split(","))
        base = v1 / own.lstrip("/") if own else v1
        return "v1", base if base.is_dir() else v1
    for root in (_ROOT, _ROOT / "unified"):
        if (root / "cgroup.controllers").exists() and "memory" in (root / "cgroup.controllers").read_text().split():
            own = _own_path(lambda c: c == "")
            base = root / own.lstrip("/") if own else root
            return "v2", base if base.is_dir() else root
    return None


class MemoryCap:
    """A fresh memory cgroup with a limit; processes added to it share the cap.

        >>> cap = MemoryCap(512 * 2**20); cap.add(pid); ...; cap.remove()

    ``limit_bytes`` may be changed later (:meth:`set_limit`): lowering it below the usage
    makes the kernel reclaim page cache first (v1 refuses with ``OSError`` if it cannot).
    ``remove()`` (or leaving the ``with`` block) moves remaining members back to the
    parent group and deletes the cgroup.
    """

    _FILES = {"v1": ("memory.limit_in_bytes", "memory.usage_in_bytes", "memory.max_usage_in_bytes"),
              "v2": ("memory.max", "memory.current", "memory.peak")}

    def __init__(self, limit_bytes: int | None, name: str | None = None) -> None:
        if limit_bytes is not None and (isinstance(limit_bytes, bool) or int(limit_bytes) < 1 << 20):
            raise ValueError(f"limit_bytes must be >= 1 MiB or None, got {limit_bytes!r}")
        found = cgroup_version()
        if found is None:
            raise CgroupUnavailable("no memory cgroup controller here (/sys/fs/cgroup has neither "
                                    "v1 memory/ nor a v2 hierarchy with 'memory'); a cap needs Linux cgroups")
        self.version, self.parent = found
        self.path = self.parent / (name or f"sparselab-{os.getpid()}-{time.monotonic_ns()}")
        try:
            self.path.mkdir()
        except OSError as err:
            raise CgroupUnavailable(f"cannot create a memory cgroup under {self.parent} ({err}); "
                                    "a cap needs root or a delegated cgroup") from err
        self._limit_file, self._usage_file, self._peak_file = self._FILES[self.version]
        try:
            self.set_limit(limit_bytes)
        except BaseException:
            self.path.rmdir()
            raise

    def __repr__(self) -> str:
        return f"MemoryCap({self.version}, {self.path}, limit={self.limit})"

    def _read(self, name: str) -> str:
        return (self.path / name).read_text().strip()

    def set_limit(self, limit_bytes: int | None) -> None:
        """Set (or with None lift) the cap."""
        value = "max" if limit_bytes is None and self.version == "v2" else \
            "-1" if limit_bytes is None else str(int(limit_bytes))
        (self.path / self._limit_file).write_text(value)

    @property
    def limit(self) -> int | None:
        v = self._read(self._limit_file)
        return None if v == "max" or int(v) >= 1 << 62 else int(v)

    @property
    def usage(self) -> int:
        """Bytes charged to the group now (anonymous memory + page cache)."""
        return int(self._read(self._usage_file))

    @property
    def peak(self) -> int | None:
        """Highest usage so far (None on v2 kernels without ``memory.peak``)."""
        try:
            return int(self._read(self._peak_file))
        except (OSError, ValueError):
            return None

    @property
    def failcnt(self) -> int:
        """Times the cap was hit (v1 ``memory.failcnt``; v2 ``max`` events)."""
        if self.version == "v1":
            return int(self._read("memory.failcnt"))
        events = dict(line.split() for line in self._read("memory.events").splitlines())
        return int(events.get("max", 0))

    def stat(self) -> dict[str, int]:
        """The group's ``memory.stat`` (cache/file, rss/anon, ... in bytes)."""
        return {k: int(v) for k, v in (line.split() for line in self._read("memory.stat").splitlines())}

    def add(self, pid: int) -> None:
        """Move process ``pid`` into the group (its future allocations are charged here)."""
        (self.path / "cgroup.procs").write_text(str(int(pid)))

    def preexec(self) -> None:
        """For ``subprocess.Popen(preexec_fn=cap.preexec)``: the child joins before exec."""
        self.add(os.getpid())

    def remove(self) -> None:
        """Move members back to the parent group and delete this one (idempotent)."""
        if not self.path.exists():
            return
        for pid in self._read("cgroup.procs").split():
            try:
                (self.parent / "cgroup.procs").write_text(pid)
            except OSError:
                pass  # the process ended meanwhile
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.02)  # charges of exited tasks drain asynchronously
        self.path.rmdir()

    def __enter__(self) -> MemoryCap:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
