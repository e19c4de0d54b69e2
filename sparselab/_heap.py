"""Give freed heap memory back to the operating system.

    >>> from sparselab._heap import trim_heap
    >>> del big_buffers; trim_heap()

glibc keeps freed small and medium blocks mapped, so the resident size of a process only
goes down when the heap is trimmed. Recording (between the layers of a trace it builds)
and benchmarking (before a memory measurement) both need that.
"""

from __future__ import annotations

import ctypes

__all__ = ["trim_heap"]


def trim_heap() -> None:
    """``malloc_trim(0)`` where the C library has it (glibc); otherwise nothing."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
