"""The command line checks its arguments before it loads a model or records anything."""

from __future__ import annotations

import re

import pytest

import sparselab as sl
from sparselab import cli


@pytest.fixture
def no_model(monkeypatch):
    """Any attempt to load a model fails the test: argument errors must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(sl, "load_model", refuse)


@pytest.mark.parametrize("argv, message", [
    (["demo", "--texts", "0"], "--texts: must be >= 1, got 0"),
    (["demo", "--max-length", "0"], "--max-length: must be >= 1, got 0"),
    (["demo", "--batch-size", "0"], "--batch-size: must be >= 1, got 0"),
    (["demo", "--batch-size", "two"], "--batch-size: expected an integer, got 'two'"),
    (["demo", "--density", "0"], r"--density: must be in \(0, 1\], got 0"),
    (["demo", "--density", "1.5"], r"--density: must be in \(0, 1\], got 1.5"),
    (["record", "--out", "{tmp}"], "is a directory: give a file name"),
    (["record", "--out", "{tmp}/missing/x.trace"], "does not exist"),
    (["record", "--out", "{tmp}/old.trace"], r"exists \(pass --overwrite to replace it\)"),
])
def test_bad_arguments_exit_2_with_a_message_and_no_work(no_model, tmp_path, capsys, argv, message):
    (tmp_path / "old.trace").write_bytes(b"a file of the user's")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    with pytest.raises(SystemExit) as stop:
        cli.main(argv)
    assert stop.value.code == 2
    assert re.search(message, capsys.readouterr().err)
    assert (tmp_path / "old.trace").read_bytes() == b"a file of the user's"


def test_good_arguments_parse_to_their_values(tmp_path):
    argv = ["record", "--out", str(tmp_path / "new.trace"), "--texts", "3", "--batch-size", "2"]
    args = cli.build_parser().parse_args(argv)
    assert (args.texts, args.batch_size, args.out.name, args.overwrite) == (3, 2, "new.trace", False)
    assert args.func is cli.record_cmd
