"""Which instruction-set path the compiled kernels run, chosen at run time from the CPU.

    >>> from sparselab._fast import isa
    >>> isa.supported()                  # e.g. ('portable', 'avx2', 'avx512', 'avx512bf16')
    >>> isa.current()                    # the best of them, unless $SPARSELAB_ISA says otherwise
    >>> with isa.use("avx2"):            # force a path (tests run every one the CPU has)
    ...     y = cache.forward(x, "silu")

Paths, slowest first: ``portable`` (plain C, any CPU), ``avx2`` (AVX2 + FMA),
``avx512`` (AVX-512 F/BW/VL), ``avx512bf16`` (as avx512, bf16 dot products with
``vdpbf16ps``). The build never bakes the build machine's instruction set into the
library: each vector version is compiled for its own target and only runs if the CPU
reports the features. At import the path is ``$SPARSELAB_ISA`` if set (a path the CPU
lacks raises at import, naming the supported ones), else the best supported.
"""

from __future__ import annotations

import contextlib
import os

from sparselab._fast import _mlp, _predict

__all__ = ["ISA_NAMES", "current", "set_isa", "supported", "use"]

ISA_NAMES: tuple[str, ...] = tuple(_mlp.ISA_NAMES)
ENV_VAR = "SPARSELAB_ISA"


def supported() -> tuple[str, ...]:
    """The paths this CPU runs, slowest first."""
    return tuple(_mlp.supported_isas())


def current() -> str:
    """The path the kernels run now."""
    return _mlp.get_isa()


def set_isa(name: str) -> str:
    """Run the kernels on path ``name`` from now on; returns the previous path. ValueError
    (nothing changed) for an unknown name or a path this CPU cannot run."""
    if name not in ISA_NAMES:
        raise ValueError(f"unknown instruction-set path {name!r}; expected one of {ISA_NAMES}")
    ok = supported()
    if name not in ok:
        raise ValueError(f"this CPU cannot run the {name!r} path; it supports {ok}")
    prev = current()
    _mlp.set_isa_unchecked(name)
    _predict.set_isa_unchecked(name)
    return prev


@contextlib.contextmanager
def use(name: str):
    """Run the kernels on path ``name`` inside the ``with`` block (restored after)."""
    prev = set_isa(name)
    try:
        yield name
    finally:
        set_isa(prev)


def _init() -> None:
    want = os.environ.get(ENV_VAR, "").strip()
    if want:
        try:
            set_isa(want)
        except ValueError as e:
            raise ValueError(f"${ENV_VAR}={want!r}: {e}") from None
    else:
        set_isa(_mlp.best_isa())


_init()
