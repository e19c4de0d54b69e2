"""Trace.save / Trace.load: round trip, atomic writes, clear errors for damaged or foreign files.

    pytest -q tests/test_trace_io.py
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from safetensors import safe_open

from sparselab.recording.trace_file import FORMAT, Trace, TraceFileError


def make_trace(seed: int = 0, n_tokens: int = 9, pieces: bool = True) -> Trace:
    g = torch.Generator().manual_seed(seed)
    layers = (1, 4)
    return Trace(
        layers=layers,
        arrays={
            "h": torch.randn(2, n_tokens, 70, generator=g).half(),
            "gate": torch.randn(2, n_tokens, 70, generator=g).half(),
            "mlp_in": torch.randn(2, n_tokens, 16, generator=g),
            "layer_in": torch.randn(2, n_tokens, 16, generator=g),
        },
        token_ids=np.arange(100, 100 + n_tokens),
        seq_ids=np.repeat([0, 1], [4, n_tokens - 4]),
        positions=np.concatenate([np.arange(4), np.arange(n_tokens - 4)]),
        steps=np.concatenate([np.zeros(6), np.arange(1, n_tokens - 5)]),
        is_prefill=np.arange(n_tokens) < 6,
        pieces=[f" tok{i}é" for i in range(n_tokens)] if pieces else None,
        meta={"model": {"name": "tiny", "hidden_size": 16}, "activation": "silu", "note": [1, 2.5]},
    )


def assert_same_trace(a: Trace, b: Trace) -> None:
    assert a.layers == b.layers
    assert sorted(a.arrays) == sorted(b.arrays)
    for name in a.arrays:
        assert a.arrays[name].dtype == b.arrays[name].dtype
        assert torch.equal(a.arrays[name], b.arrays[name])
    for name in ("token_ids", "seq_ids", "positions", "steps", "is_prefill"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
        assert getattr(a, name).dtype == getattr(b, name).dtype
    assert a.pieces == b.pieces
    assert a.meta == b.meta


# -- round trip -------------------------------------------------------------------------


@pytest.mark.parametrize("pieces", [True, False])
def test_round_trip(tmp_path, pieces):
    trace = make_trace(pieces=pieces)
    out = trace.save(tmp_path / "sub" / "a.trace")
    assert out == tmp_path / "sub" / "a.trace"
    assert_same_trace(trace, Trace.load(out))


def test_round_trip_of_a_token_selection(tmp_path):
    sub = make_trace().select_tokens(np.array([7, 2, 5]))
    sub.save(tmp_path / "s.trace")
    loaded = Trace.load(tmp_path / "s.trace")
    assert_same_trace(sub, loaded)
    np.testing.assert_array_equal(loaded.token_ids, [107, 102, 105])


def test_file_is_plain_safetensors_with_json_metadata(tmp_path):
    # no pickle: the file opens with safetensors' own reader and its metadata is JSON
    path = make_trace().save(tmp_path / "a.trace")
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        header = json.loads(f.metadata()[FORMAT])
    assert {"array.h", "array.gate", "array.mlp_in", "array.layer_in"} <= keys
    assert header["format"] == FORMAT and header["layers"] == [1, 4]
    assert not path.read_bytes().startswith(b"\x80")  # pickle protocol marker


# -- atomic writes ----------------------------------------------------------------------


def test_no_temp_files_left_after_save(tmp_path):
    make_trace().save(tmp_path / "a.trace")
    make_trace(seed=1).save(tmp_path / "a.trace")  # overwrite
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.trace"]
    assert_same_trace(make_trace(seed=1), Trace.load(tmp_path / "a.trace"))


def test_failing_save_leaves_existing_file_untouched(tmp_path, monkeypatch):
    path = make_trace().save(tmp_path / "a.trace")
    before = path.read_bytes()

    def half_written_then_crash(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial garbage")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", half_written_then_crash)
    with pytest.raises(OSError, match="disk full"):
        make_trace(seed=1).save(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.trace"]


def test_failing_first_save_creates_nothing(tmp_path, monkeypatch):
    def crash(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        make_trace().save(tmp_path / "a.trace")
    assert list(tmp_path.iterdir()) == []


# -- damaged and foreign files ----------------------------------------------------------


def header_length(path: Path) -> int:
    return struct.unpack("<Q", path.read_bytes()[:8])[0]


@pytest.mark.parametrize("where", ["empty", 3, 8, 20, "mid_header", "header_end", "mid_data", "last_byte"])
def test_truncated_file_is_a_clear_error(tmp_path, where):
    path = make_trace().save(tmp_path / "a.trace")
    data = path.read_bytes()
    n = header_length(path)
    cut = {
        "empty": 0,
        "mid_header": 8 + n // 2,
        "header_end": 8 + n,
        "mid_data": (8 + n + len(data)) // 2,
        "last_byte": len(data) - 1,
    }.get(where, where)
    path.write_bytes(data[:cut])
    with pytest.raises(TraceFileError, match="truncated|not a sparselab trace"):
        Trace.load(path)


def test_foreign_safetensors_file(tmp_path):
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file({"weight": torch.zeros(3, 3)}, str(path), metadata={"format": "pt"})
    with pytest.raises(TraceFileError, match="safetensors file but not a sparselab trace"):
        Trace.load(path)


@pytest.mark.parametrize("seed", range(5))
def test_random_bytes(tmp_path, seed):
    path = tmp_path / "noise.bin"
    path.write_bytes(np.random.default_rng(seed).bytes(2000))
    with pytest.raises(TraceFileError, match="not a sparselab trace"):
        Trace.load(path)


def test_other_formats(tmp_path):
    npz = tmp_path / "a.npz"
    np.savez(npz, x=np.zeros(3))
    with pytest.raises(TraceFileError, match="not a sparselab trace"):
        Trace.load(npz)
    text = tmp_path / "a.json"
    text.write_text(json.dumps({"format": FORMAT}) * 20)
    with pytest.raises(TraceFileError, match="not a sparselab trace"):
        Trace.load(text)


def write_raw(path: Path, header: dict, data: bytes = b"") -> None:
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


def test_malformed_header_entries(tmp_path):
    meta = {FORMAT: json.dumps({"format": FORMAT, "version": 1, "layers": [0]})}
    path = tmp_path / "bad.trace"
    write_raw(path, {"__metadata__": meta, "array.h": 5}, b"\0" * 16)
    with pytest.raises(TraceFileError, match="not a sparselab trace"):
        Trace.load(path)
    write_raw(path, {"__metadata__": meta, "array.h": {"dtype": "F16"}}, b"\0" * 16)
    with pytest.raises(TraceFileError, match="not a sparselab trace"):
        Trace.load(path)
    write_raw(path, [1, 2, 3])
    with pytest.raises(TraceFileError, match="not a sparselab trace"):
        Trace.load(path)


def test_newer_format_version(tmp_path):
    path = tmp_path / "new.trace"
    meta = {FORMAT: json.dumps({"format": FORMAT, "version": 99, "layers": []})}
    safetensors.torch.save_file({"token.token_ids": torch.zeros(1, dtype=torch.int64)}, str(path), metadata=meta)
    with pytest.raises(TraceFileError, match="newer sparselab"):
        Trace.load(path)


def test_missing_token_fields(tmp_path):
    path = tmp_path / "partial.trace"
    meta = {FORMAT: json.dumps({"format": FORMAT, "version": 1, "layers": [0]})}
    safetensors.torch.save_file({"token.token_ids": torch.zeros(2, dtype=torch.int64)}, str(path), metadata=meta)
    with pytest.raises(TraceFileError, match="missing token fields"):
        Trace.load(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no trace file"):
        Trace.load(tmp_path / "nope.trace")
    os.mkdir(tmp_path / "dir.trace")
    with pytest.raises(FileNotFoundError):
        Trace.load(tmp_path / "dir.trace")


def test_inconsistent_tensor_entry_is_a_trace_file_error(tmp_path):
    # framing is fine (sizes add up) but the tensor entry contradicts its byte range
    meta = {FORMAT: json.dumps({"format": FORMAT, "version": 1, "layers": [0]})}
    path = tmp_path / "bad.trace"
    write_raw(path, {"__metadata__": meta, "array.h": {"dtype": "F16", "shape": [1, 1, 5], "data_offsets": [0, 16]}}, b"\0" * 16)
    with pytest.raises(TraceFileError, match="corrupted sparselab trace"):
        Trace.load(path)


def _rewrite(path: Path, edit_header=None, edit_tensors=None) -> None:
    """Re-save a trace file with its JSON header and/or tensors changed (a hand-edited file)."""
    with safe_open(str(path), "pt") as f:
        header = json.loads(f.metadata()[FORMAT])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if edit_header:
        edit_header(header)
    if edit_tensors:
        edit_tensors(tensors)
    safetensors.torch.save_file(tensors, str(path), metadata={FORMAT: json.dumps(header)})


@pytest.mark.parametrize("edit, message", [
    (lambda h: h.update(layers="1,4"), "'layers' must be a list of layer numbers"),
    (lambda h: h.update(layers=[1, True]), "'layers' must be a list of layer numbers"),
    (lambda h: h.update(meta=[1, 2]), "'meta' must be a JSON object, got list"),
    (lambda h: h.update(pieces="abc"), "'pieces' must be null or a list of 9 strings"),
    (lambda h: h.update(layers=[1]), r"array '\w+' must be \[1 layers, 9 tokens, width\]"),
])
def test_wrong_typed_header_fields_are_trace_file_errors(tmp_path, edit, message):
    path = make_trace().save(tmp_path / "t.trace")
    _rewrite(path, edit_header=edit)
    with pytest.raises(TraceFileError, match=message):
        Trace.load(path)


def test_a_tensor_whose_dtype_was_changed_is_refused(tmp_path):
    trace = make_trace()
    trace.meta["store_dtype"] = "float16"
    path = trace.save(tmp_path / "t.trace")
    # same element size, other dtype: the bytes would be read as garbage bf16 values
    _rewrite(path, edit_tensors=lambda t: t.update({"array.h": t["array.h"].view(torch.bfloat16)}))
    with pytest.raises(TraceFileError, match="'h' is torch.bfloat16 but the trace was recorded as float16"):
        Trace.load(path)
    path = make_trace().save(tmp_path / "u.trace")
    _rewrite(path, edit_tensors=lambda t: t.update(
        {"token.positions": t["token.positions"].view(torch.float64)}))
    with pytest.raises(TraceFileError, match="token field 'positions' must be int64"):
        Trace.load(path)


def test_saved_files_are_not_private_and_keep_the_mode_they_replace(tmp_path):
    old = os.umask(0o022)
    try:
        path = make_trace().save(tmp_path / "t.trace")
        assert path.stat().st_mode & 0o777 == 0o644
        os.chmod(path, 0o640)
        make_trace(seed=1).save(path)
        assert path.stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(old)
