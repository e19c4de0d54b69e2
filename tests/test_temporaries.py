"""Saves killed half-way (issue 11): Trace.save's orphan temporaries and Predictors.save's swap.

Kills are real SIGKILLs of a child process (os.replace patched to kill the writer at the
chosen moment); stale temporaries of dead writers go on the next save or load of the same
path, a live writer's are never touched.

    pytest -q tests/test_temporaries.py
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import sparselab as sl
from sparselab._temporaries import (
    Temporary,
    is_stale,
    remove_stale,
    temp_dir,
    temp_file,
    temporaries,
)
from sparselab.masking.rules import TopK
from sparselab.prediction import Policy, Predictors


def dead_pid() -> int:
    """The pid of a process that has exited (and was reaped)."""
    out = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                         capture_output=True, text=True, check=True)
    return int(out.stdout)


def make_trace(seed: int = 0, n_tokens: int = 7) -> sl.Trace:
    g = torch.Generator().manual_seed(seed)
    return sl.Trace(layers=(0, 1), arrays={"h": torch.randn(2, n_tokens, 70, generator=g).half()},
                    token_ids=np.arange(n_tokens), seq_ids=np.zeros(n_tokens),
                    positions=np.arange(n_tokens), steps=np.zeros(n_tokens),
                    is_prefill=np.ones(n_tokens, dtype=bool), meta={"note": seed})


def make_predictors(seed: int = 0) -> Predictors:
    g = torch.Generator().manual_seed(seed)
    return Predictors({0: (torch.randn(2, 8, generator=g), torch.randn(12, 2, generator=g),
                           torch.randn(12, generator=g))}, TopK(keep=3), policy=Policy("top_k", 3))


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(Path(sl.__file__).parent.parent), "OMP_NUM_THREADS": "1"}


# os.replace is how both savers publish their result (shutil.rmtree how the predictors'
# backup goes): after its imports, the child kills itself at call `n` of `{module}.{function}`
KILL_AT = '''
import os, shutil, signal, sys
calls = []
real = {module}.{function}
def killing(*args, **kwargs):
    calls.append(1)
    if len(calls) == {n}:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, **kwargs)
{module}.{function} = killing
'''

SAVE_TRACE = '''
import numpy as np, torch
import sparselab as sl
''' + KILL_AT + '''
n = 7
trace = sl.Trace(layers=(0, 1), arrays={{"h": torch.randn(2, n, 70).half()}},
                 token_ids=np.arange(n), seq_ids=np.zeros(n), positions=np.arange(n),
                 steps=np.zeros(n), is_prefill=np.ones(n, dtype=bool))
trace.save(sys.argv[1])
'''

SAVE_PREDICTORS = '''
import torch
from sparselab.masking.rules import TopK
from sparselab.prediction import Policy, Predictors
''' + KILL_AT + '''
g = torch.Generator().manual_seed(int(sys.argv[2]))
Predictors({{0: (torch.randn(2, 8, generator=g), torch.randn(12, 2, generator=g),
                torch.randn(12, generator=g))}}, TopK(keep=3), policy=Policy("top_k", 3)).save(sys.argv[1])
'''


def run_killed(tmp_path: Path, source: str, *args: str, n: int = 1, at: str = "os.replace") -> None:
    """Run ``source`` in a child that SIGKILLs itself at the ``n``-th call of ``at``."""
    module, function = at.split(".")
    script = tmp_path / "child.py"
    script.write_text(source.format(module=module, function=function, n=n))
    proc = subprocess.run([sys.executable, str(script), *args], env=child_env(), timeout=120,
                          capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr


# ------------------------------------------------------------------------- the module


def test_temporaries_are_named_after_their_target_and_writer(tmp_path):
    target = tmp_path / "run.trace"
    fd, tmp = temp_file(target)
    os.close(fd)
    directory = temp_dir(target, "old")
    assert tmp.name.startswith(f".run.trace.sparselab-tmp.{os.getpid()}.")
    assert directory.name.startswith(f".run.trace.sparselab-old.{os.getpid()}.")
    found = temporaries(target)
    assert {(t.path, t.kind, t.pid) for t in found} == {(tmp, "tmp", os.getpid()),
                                                        (directory, "old", os.getpid())}
    assert not any(is_stale(t) for t in found)  # ours, written after we started
    with pytest.raises(ValueError, match="kind"):
        temp_file(target, "new")


def test_only_stale_temporaries_of_the_target_are_removed(tmp_path):
    target = tmp_path / "run.trace"
    pid = dead_pid()
    dead = tmp_path / f".run.trace.sparselab-tmp.{pid}.abc123"
    dead_dir = tmp_path / f".run.trace.sparselab-old.{pid}.q_9"
    dead.write_bytes(b"x" * 100)
    dead_dir.mkdir()
    (dead_dir / "predictors.json").write_text("{}")
    # our pid, but older than this process: the pid was reused, the writer is gone
    reused = tmp_path / f".run.trace.sparselab-tmp.{os.getpid()}.old1"
    reused.write_bytes(b"x")
    long_ago = time.time() - 10 * 24 * 3600
    os.utime(reused, (long_ago, long_ago))
    fd, live = temp_file(target)  # a live writer's (ours, fresh)
    os.close(fd)
    untouched = [
        tmp_path / f".other.trace.sparselab-tmp.{pid}.abc123",   # another target
        tmp_path / f".run.trace.sparselab-tmp.{pid}",             # no random part
        tmp_path / ".run.trace.sparselab-tmp.notapid.abc",        # not a pid
        tmp_path / f".run.trace.sparselab-tmp.{pid}.a.b",         # not our pattern
        tmp_path / f".run.trace.abc{pid}",                        # an old mkstemp name
    ]
    for p in untouched:
        p.write_bytes(b"keep")
    assert sorted(remove_stale(target)) == sorted([dead, dead_dir, reused])
    assert live.exists() and all(p.exists() for p in untouched)
    assert not dead.exists() and not dead_dir.exists() and not reused.exists()
    assert is_stale(Temporary(tmp_path / "x", "tmp", 0))


# ------------------------------------------------------------------------- Trace.save


def test_sigkill_during_trace_save_leaves_a_temporary_that_the_next_load_removes(tmp_path):
    path = make_trace(seed=1).save(tmp_path / "a.trace")
    run_killed(tmp_path, SAVE_TRACE, str(path))  # killed before its rename
    orphans = [p for p in tmp_path.iterdir() if p.name.startswith(".a.trace.sparselab-tmp.")]
    assert len(orphans) == 1 and orphans[0].stat().st_size > 0
    loaded = sl.Trace.load(path)  # the old file is intact; the orphan goes
    assert loaded.meta["note"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.trace", "child.py"]


def test_the_next_save_removes_a_killed_saves_temporary(tmp_path):
    path = tmp_path / "b.trace"
    run_killed(tmp_path, SAVE_TRACE, str(path))  # first save ever: killed
    assert not path.exists() and len(temporaries(path)) == 1
    make_trace(seed=2).save(path)
    assert temporaries(path) == [] and sl.Trace.load(path).meta["note"] == 2


# -------------------------------------------------------------------- Predictors.save


def assert_same_predictors(a: Predictors, b: Predictors) -> None:
    for x, y in zip(a.layer_weights(0), b.layer_weights(0), strict=True):
        assert torch.equal(x, y)


def leftovers(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}."))


def test_kill_between_the_two_renames_is_recovered_on_load(tmp_path):
    path = make_predictors(seed=1).save(tmp_path / "preds")
    # 1st os.replace moves the old directory aside, the 2nd would move the new one in
    run_killed(tmp_path, SAVE_PREDICTORS, str(path), "5", n=2)
    assert not path.exists()
    assert sorted(t.kind for t in temporaries(path)) == ["old", "tmp"]  # both complete
    loaded = Predictors.load(path)  # the new, complete directory is put in place
    assert_same_predictors(loaded, make_predictors(seed=5))
    assert leftovers(path) == []


def test_the_next_save_recovers_first_then_replaces(tmp_path):
    path = make_predictors(seed=1).save(tmp_path / "preds")
    run_killed(tmp_path, SAVE_PREDICTORS, str(path), "5", n=2)
    (new,) = [t.path for t in temporaries(path) if t.kind == "tmp"]
    with open(new / "predictors.safetensors", "ab") as f:  # damaged: checksum no longer matches
        f.write(b"\0")
    make_predictors(seed=9).save(path)  # the next save recovers first, then replaces
    assert_same_predictors(Predictors.load(path), make_predictors(seed=9))
    assert leftovers(path) == []


def test_kill_between_the_renames_recovers_the_old_one_when_the_new_is_incomplete(tmp_path):
    path = make_predictors(seed=1).save(tmp_path / "preds")
    run_killed(tmp_path, SAVE_PREDICTORS, str(path), "5", n=2)
    (new,) = [t.path for t in temporaries(path) if t.kind == "tmp"]
    (new / "predictors.json").unlink()
    assert_same_predictors(Predictors.load(path), make_predictors(seed=1))
    assert leftovers(path) == []


def test_kill_after_the_swap_leaves_only_a_backup_that_goes(tmp_path):
    path = make_predictors(seed=1).save(tmp_path / "preds")
    run_killed(tmp_path, SAVE_PREDICTORS, str(path), "5", at="shutil.rmtree")  # after both renames
    assert [t.kind for t in temporaries(path)] == ["old"]
    assert_same_predictors(Predictors.load(path), make_predictors(seed=5))
    assert leftovers(path) == []


def test_an_error_between_the_renames_puts_the_old_directory_back(tmp_path, monkeypatch):
    path = make_predictors(seed=1).save(tmp_path / "preds")
    real, calls = os.replace, []

    def failing_second_replace(src, dst):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk gone")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", failing_second_replace)
    with pytest.raises(OSError, match="disk gone"):
        make_predictors(seed=5).save(path)
    monkeypatch.undo()
    assert_same_predictors(Predictors.load(path), make_predictors(seed=1))
    assert leftovers(path) == []


def test_a_live_writers_temporaries_are_not_recovered(tmp_path):
    path = tmp_path / "preds"
    # a save in progress in this (live) process: its new directory is complete, the path
    # is missing for an instant; a load must not steal the directory from under it
    new = temp_dir(path, "tmp")
    make_predictors(seed=3).save(tmp_path / "elsewhere")
    for name in ("predictors.json", "predictors.safetensors"):
        (new / name).write_bytes((tmp_path / "elsewhere" / name).read_bytes())
    with pytest.raises(FileNotFoundError, match="no predictors directory"):
        Predictors.load(path)
    assert new.exists() and not path.exists()
