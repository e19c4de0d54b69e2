"""Temporaries written beside a target path, named so that a later save or load of the same
target finds the ones a killed writer left behind, and removes only those.

    >>> fd, tmp = temp_file("run.trace")    # ./.run.trace.sparselab-tmp.<pid>.<random>
    >>> remove_stale("run.trace")           # leftovers of dead writers of run.trace: removed

A temporary of target ``name`` is ``.{name}.sparselab-{kind}.{pid}.{random}``: the target's
name, what it is (``tmp``: the new content being written; ``old``: the previous content
moved aside during a replacement) and the writer's pid. It is *stale* when that writer
cannot be writing it any more: no process has that pid, or the process that has it started
after the temporary was last modified (the pid was reused, e.g. by a restarted container).
A live writer's temporaries are never touched. Temporaries of other targets in the same
directory, and files that merely look similar, are left alone.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Temporary", "is_stale", "remove_stale", "stale_temporaries", "temp_dir", "temp_file",
           "temporaries"]

KINDS = ("tmp", "old")
_REST = re.compile(r"^(\d+)\.[A-Za-z0-9_]+$")  # "<pid>.<mkstemp's random part>"


@dataclass(frozen=True)
class Temporary:
    """One temporary of a target: its path, kind (``"tmp"`` or ``"old"``) and writer pid."""

    path: Path
    kind: str
    pid: int


def _prefix(target: Path, kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return f".{target.name}.sparselab-{kind}."


def temp_file(target: str | os.PathLike, kind: str = "tmp") -> tuple[int, Path]:
    """``(fd, path)`` of a new private temporary file beside ``target`` (see module docstring).

        >>> fd, tmp = temp_file("run.trace"); os.close(fd)
    """
    target = Path(target)
    fd, name = tempfile.mkstemp(prefix=f"{_prefix(target, kind)}{os.getpid()}.", dir=target.parent)
    return fd, Path(name)


def temp_dir(target: str | os.PathLike, kind: str = "tmp") -> Path:
    """A new private (0700) temporary directory beside ``target`` (see module docstring).

        >>> tmp = temp_dir("smollm2.predictors")
    """
    target = Path(target)
    return Path(tempfile.mkdtemp(prefix=f"{_prefix(target, kind)}{os.getpid()}.", dir=target.parent))


def temporaries(target: str | os.PathLike, kinds: tuple[str, ...] = KINDS) -> list[Temporary]:
    """Every temporary of ``target`` of the given kinds, live or stale, oldest first.

        >>> [t.pid for t in temporaries("run.trace")]
    """
    target = Path(target)
    parent = target.parent if str(target.parent) else Path(".")
    found = []
    try:
        entries = list(os.scandir(parent))
    except FileNotFoundError:
        return []
    for entry in entries:
        for kind in kinds:
            prefix = _prefix(target, kind)
            if entry.name.startswith(prefix):
                match = _REST.match(entry.name[len(prefix):])
                if match:
                    found.append(Temporary(Path(entry.path), kind, int(match.group(1))))
    return sorted(found, key=lambda t: _mtime(t.path))


def _mtime(path: Path) -> float:
    try:
        return path.lstat().st_mtime
    except FileNotFoundError:
        return float("inf")


def _process(pid: int) -> tuple[float | None, bool]:
    """(start time in seconds since the epoch or None if unknown, is a zombie) of ``pid``."""
    try:
        import psutil

        proc = psutil.Process(pid)
        return proc.create_time(), proc.status() == psutil.STATUS_ZOMBIE
    except Exception:  # psutil missing, process gone or not readable: unknown
        return None, False


def is_stale(temporary: Temporary) -> bool:
    """Whether ``temporary``'s writer is gone: no process ``pid`` (or a zombie), or one
    started after the temporary was last modified (a reused pid). Ours are live.

        >>> is_stale(Temporary(Path(".run.trace.sparselab-tmp.4242.ab12"), "tmp", 4242))
    """
    pid = temporary.pid
    if pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # a process of another user has that pid: it is alive
        pass
    started, zombie = _process(pid)
    # a second of slack: file and process clocks are read differently
    return zombie or (started is not None and started > _mtime(temporary.path) + 1.0)


def stale_temporaries(target: str | os.PathLike, kinds: tuple[str, ...] = KINDS) -> list[Temporary]:
    """The temporaries of ``target`` whose writers are gone (oldest first)."""
    return [t for t in temporaries(target, kinds) if is_stale(t)]


def remove(path: Path) -> bool:
    """Remove a temporary file or directory; whether it is gone (best effort: a directory
    we may not write to keeps it, and the caller's save or load goes on)."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    except FileNotFoundError:
        pass
    except OSError:
        return False
    return True


def remove_stale(target: str | os.PathLike, kinds: tuple[str, ...] = KINDS) -> list[Path]:
    """Remove the stale temporaries of ``target``; returns the paths removed.

        >>> remove_stale("run.trace")      # after a save was SIGKILLed: its ~GiB temp goes
    """
    return [t.path for t in stale_temporaries(target, kinds) if remove(t.path)]
