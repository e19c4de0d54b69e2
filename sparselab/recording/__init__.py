"""Recording: hooks on a model's gated MLPs -> a :class:`Trace` per token and layer.

    >>> trace = sl.record(model, tokenizer, texts, max_length=256)
    >>> with sl.Recorder(model, tokenizer=tokenizer) as rec:     # hooks always removed
    ...     model.generate(**batch, max_new_tokens=32)
    >>> rec.trace.activations(12)

Modules: :mod:`.recorder` (``Recorder``, ``record``), :mod:`.trace` (the ``Trace``),
:mod:`.trace_file` (safetensors files, no pickle), :mod:`.zarr_store` (streamed, resumable
Zarr stores read lazily by ``Trace.open``; imported on first use).
"""

from sparselab.recording.recorder import Recorder, RecordingTooLarge, estimate_trace_bytes, record
from sparselab.recording.trace import ARRAYS, TOKEN_FIELDS, Trace
from sparselab.recording.trace_file import TraceFileError, load_trace, save_trace

__all__ = ["ARRAYS", "TOKEN_FIELDS", "Recorder", "RecordingTooLarge", "Trace", "TraceFileError",
           "estimate_trace_bytes", "load_trace", "record", "save_trace"]
