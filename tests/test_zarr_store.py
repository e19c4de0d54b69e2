"""Streamed Zarr traces on a tiny random Llama: equal to the in-memory recording, lazy
open, format conversion, resume after an exception and after SIGKILL, mismatch checks,
the up-front memory estimate.

    pytest -q tests/test_zarr_store.py
"""

from __future__ import annotations

import json
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
from sparselab.recording import TOKEN_FIELDS, RecordingTooLarge, estimate_trace_bytes
from sparselab.recording.zarr_store import StoreMismatch, ZarrTrace, convert
from sparselab.testing.tiny import WORD_TOKEN_IDS, tiny_llama, word_tokenizer

VOCAB = 100
TEXTS = [" ".join(f"w{(i * 7 + j) % 90 + 5}" for j in range(3 + i % 9)) for i in range(13)]
MODEL_ARGS = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_layers=3,
                  max_position_embeddings=64, **WORD_TOKEN_IDS)



pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():
    return tiny_llama(**MODEL_ARGS)


@pytest.fixture(scope="module")
def tokenizer():
    return word_tokenizer(VOCAB)


@pytest.fixture(scope="module")
def dense(model, tokenizer):
    return sl.record(model, tokenizer, TEXTS, batch_size=3, progress=False)


def assert_same(a, b):
    """Same tokens, metadata, pieces and every recorded value, bit for bit."""
    assert a.n_tokens == b.n_tokens and a.layers == b.layers
    for f in TOKEN_FIELDS:
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f), err_msg=f)
    assert sorted(a.arrays) == sorted(b.arrays)
    for name in a.arrays:
        for layer in a.layers:
            assert torch.equal(a.values(name, layer), b.values(name, layer)), (name, layer)
    assert a.pieces == b.pieces


def test_streamed_equals_in_memory(model, tokenizer, dense, tmp_path):
    out = tmp_path / "run.zarr"
    trace = sl.record(model, tokenizer, TEXTS, batch_size=3, progress=False, out=out, chunk_tokens=7)
    assert isinstance(trace, ZarrTrace) and trace.progress["complete"]
    assert trace.progress["passages"] and len(trace.progress["passages"]) == len(TEXTS)
    assert_same(dense, trace)
    reopened = sl.Trace.open(out)
    assert_same(dense, reopened)
    assert reopened.to_frame().equals(dense.to_frame())
    rule = sl.rules.Calibrated(density=0.3)
    np.testing.assert_array_equal(reopened.masks(rule).bits, dense.masks(rule).bits)
    sub = reopened.select_sequences([2, 5])
    assert_same(dense.select_sequences([2, 5]), sub)
    assert reopened.arrays["h"].to_dask().shape == tuple(dense.arrays["h"].shape)


def test_compressed_and_mask_only_stores(model, tokenizer, dense, tmp_path):
    rule = sl.rules.TopK(keep=0.25)
    both = sl.record(model, tokenizer, TEXTS, batch_size=3, progress=False, out=tmp_path / "a.zarr",
                     compression="zstd", store=("h",), masks=rule)
    assert torch.equal(both.activations(1), dense.activations(1))
    np.testing.assert_array_equal(both.stored_masks().bits, dense.masks(rule).bits)
    only = sl.record(model, tokenizer, TEXTS, batch_size=3, progress=False, out=tmp_path / "m.zarr",
                     store=(), masks=rule)
    assert only.arrays == {}
    np.testing.assert_array_equal(only.stored_masks().bits, dense.masks(rule).bits)
    with pytest.raises(ValueError, match="fitted"):
        sl.record(model, tokenizer, TEXTS, out=tmp_path / "x.zarr", masks=sl.rules.Calibrated(0.5),
                  progress=False)
    assert not (tmp_path / "x.zarr").exists()


def test_save_and_convert_both_ways(dense, tmp_path):
    store = dense.save(tmp_path / "d.zarr")
    assert_same(dense, sl.Trace.open(store))
    convert(store, tmp_path / "d.trace")
    assert_same(dense, sl.Trace.load(tmp_path / "d.trace"))
    convert(tmp_path / "d.trace", tmp_path / "e.zarr")
    assert_same(dense, sl.Trace.open(tmp_path / "e.zarr"))
    sl.Trace.open(store).save(tmp_path / "f.trace")
    assert_same(dense, sl.Trace.load(tmp_path / "f.trace"))


def test_resume_after_an_exception(model, tokenizer, dense, tmp_path, monkeypatch):
    out = tmp_path / "run.zarr"
    calls = {"n": 0}
    forward = type(model).forward

    def failing(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "forward", failing)
    with pytest.raises(KeyboardInterrupt):
        sl.record(model, tokenizer, TEXTS, batch_size=3, progress=False, out=out)
    monkeypatch.setattr(type(model), "forward", forward)
    partial = sl.Trace.open(out)  # readable, holds the two committed batches
    assert not partial.progress["complete"] and len(partial.progress["passages"]) == 6
    assert_same(dense.select_sequences(range(6)), partial.to_memory())
    resumed = sl.record(model, tokenizer, TEXTS, batch_size=3, progress=False, out=out, resume=True)
    assert_same(dense, resumed)
    again = sl.record(model, tokenizer, TEXTS, batch_size=3, progress=False, out=out, resume=True)
    assert_same(dense, again)  # complete: returned as is


def test_failed_background_write_stops_commits_and_resumes(model, tokenizer, dense, tmp_path,
                                                          monkeypatch):
    """A write that fails on the writer thread (a full disk) surfaces in the caller, and no
    commit lands past it: the store holds a prefix of whole batches and resumes."""
    from sparselab.recording.zarr_store import ZarrWriter

    out = tmp_path / "run.zarr"
    write_rows, calls = ZarrWriter._write_rows, {"n": 0}

    def failing(self, *args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(28, "No space left on device")
        return write_rows(self, *args)

    monkeypatch.setattr(ZarrWriter, "_write_rows", failing)
    with pytest.raises(OSError, match="No space left"):
        sl.record(model, tokenizer, TEXTS, batch_size=3, progress=False, out=out)
    monkeypatch.setattr(ZarrWriter, "_write_rows", write_rows)
    partial = sl.Trace.open(out)
    assert not partial.progress["complete"] and len(partial.progress["passages"]) == 6
    assert_same(dense.select_sequences(range(6)), partial.to_memory())
    assert_same(dense, sl.record(model, tokenizer, TEXTS, batch_size=3, progress=False, out=out,
                                 resume=True))


def test_background_and_inline_writers_write_the_same_store(dense, tmp_path):
    from sparselab.recording.zarr_store import ZarrWriter

    arrays = {k: (int(v.shape[2]), v.dtype) for k, v in dense.arrays.items()}
    stores = []
    for background in (True, False):
        path = tmp_path / f"bg{background}.zarr"
        writer = ZarrWriter.create(path, dense.layers, arrays, config={}, meta={},
                                   chunk_tokens=4, n_neurons=dense.n_neurons,
                                   pieces=dense.pieces is not None)
        writer._background = background
        for start in range(0, dense.n_tokens, 5):  # batches that straddle chunks
            stop = min(start + 5, dense.n_tokens)
            writer.append({f: getattr(dense, f)[start:stop] for f in TOKEN_FIELDS},
                          {(k, layer): dense.arrays[k][j, start:stop]
                           for k in dense.arrays for j, layer in enumerate(dense.layers)},
                          None if dense.pieces is None else dense.pieces[start:stop])
            writer.commit()
        writer.commit(n_seqs=dense.n_sequences, complete=True)
        writer.close()
        stores.append(sl.Trace.open(path))
    assert_same(dense, stores[0])
    assert_same(stores[1], stores[0])


def test_resume_refuses_another_run(model, tokenizer, tmp_path):
    out = tmp_path / "run.zarr"
    sl.record(model, tokenizer, TEXTS[:6], batch_size=3, progress=False, out=out)
    before = json.loads((out / "zarr.json").read_text())
    with pytest.raises(FileExistsError, match="resume=True"):
        sl.record(model, tokenizer, TEXTS, batch_size=3, progress=False, out=out)
    with pytest.raises(StoreMismatch, match="config"):
        sl.record(model, tokenizer, TEXTS, batch_size=2, progress=False, out=out, resume=True)
    with pytest.raises(StoreMismatch, match="another model"):
        other = tiny_llama(**MODEL_ARGS, seed=1)  # same shapes, other weights
        sl.record(other, tokenizer, TEXTS, batch_size=3, progress=False, out=out, resume=True)
    with pytest.raises(StoreMismatch, match="other texts"):
        sl.record(model, tokenizer, TEXTS[::-1], batch_size=3, progress=False, out=out, resume=True)
    assert json.loads((out / "zarr.json").read_text()) == before  # nothing changed
    with pytest.raises(ValueError, match="not a sparselab trace store|not a Zarr"):
        (tmp_path / "empty.zarr").mkdir()
        sl.Trace.open(tmp_path / "empty.zarr")


KILLED_RUN = '''
import sys, time, torch
import sparselab as sl
from sparselab.recording.zarr_store import ZarrWriter
from sparselab.testing.tiny import tiny_llama, word_tokenizer
torch.set_num_threads(1)
write_progress = ZarrWriter._write_progress  # the durable step (on the writer thread)
def slow_commit(self, progress):
    write_progress(self, progress)
    print("committed", len(progress["passages"]), flush=True)
    time.sleep(0.05)
ZarrWriter._write_progress = slow_commit
model = tiny_llama(**{model_args!r})
sl.record(model, word_tokenizer({vocab}), {texts!r}, batch_size=1, progress=False,
          out=sys.argv[1], chunk_tokens=5)
'''


def test_sigkill_mid_run_keeps_committed_batches_and_resumes(model, tokenizer, tmp_path):
    out = tmp_path / "killed.zarr"
    texts = TEXTS * 4
    script = tmp_path / "run.py"
    script.write_text(KILLED_RUN.format(model_args=MODEL_ARGS,
                                        vocab=VOCAB, texts=texts))
    env = {**os.environ, "PYTHONPATH": str(Path(sl.__file__).parent.parent), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(script), str(out)], stdout=subprocess.PIPE,
                            text=True, env=env)
    try:
        for line in proc.stdout:
            if line.startswith("committed") and int(line.split()[1]) >= 5:
                time.sleep(0.02)  # land inside the next batch's writes
                break
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    partial = sl.Trace.open(out)
    n_done = len(partial.progress["passages"])
    assert 5 <= n_done < len(texts) and not partial.progress["complete"]
    full = sl.record(model, tokenizer, texts, batch_size=1, progress=False)
    assert_same(full.select_sequences(range(n_done)), partial.to_memory())
    resumed = sl.record(model, tokenizer, texts, batch_size=1, progress=False, out=out, resume=True)
    assert_same(full, resumed)
    assert not list(out.rglob("*.partial"))


def test_memory_estimate_and_clear_error(model, tokenizer, dense, monkeypatch):
    nbytes = sum(v.numel() * v.element_size() for v in dense.arrays.values())
    estimate = estimate_trace_bytes(model, dense.n_tokens)
    assert nbytes <= estimate <= nbytes + 64 * dense.n_tokens

    import psutil

    class Small:
        available = nbytes // 2

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Small)
    with pytest.raises(RecordingTooLarge, match="out="):
        sl.record(model, tokenizer, TEXTS, batch_size=3, progress=False)
    trace = sl.record(model, tokenizer, TEXTS, batch_size=3, progress=False, check_memory=False)
    assert trace.n_tokens == dense.n_tokens


def test_recorder_streams_any_forward(model, tmp_path):
    ids = torch.randint(3, VOCAB, (4, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), sl.Recorder(model, store=("h", "gate")) as rec:
        model(input_ids=ids)
        model(input_ids=ids[:2, :5])
    with torch.no_grad(), sl.Recorder(model, store=("h", "gate"), out=tmp_path / "r.zarr", chunk_tokens=4) as srec:
        model(input_ids=ids)
        model(input_ids=ids[:2, :5])
    streamed = srec.trace
    assert isinstance(streamed, ZarrTrace) and streamed.n_tokens == 4 * 9 + 2 * 5
    assert_same(rec.trace, streamed)
    with pytest.raises(FileExistsError):
        sl.Recorder(model, out=tmp_path / "r.zarr")
    with pytest.raises(ValueError, match="nothing would be recorded"):
        sl.Recorder(model, store=(), out=tmp_path / "s.zarr")
