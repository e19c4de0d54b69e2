"""Embedded English text that needs no download.

    >>> texts = sl.load_corpus()                 # passages from Python's own docs
    >>> train, held_out = sl.corpus.split(texts, held_out=0.25)

The default corpus is ``pydoc_data.topics``: the reference-manual topics that ship with
every CPython (prose about the language, a few hundred kilobytes). Passages are built
deterministically (topics in sorted order, paragraphs joined until a passage reaches
``min_chars``), so every machine sees the same text.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

CORPORA = ("pydoc",)


def _paragraphs(text: str) -> list[str]:
    """Blank-line separated paragraphs with inner whitespace collapsed."""
    parts = re.split(r"\n\s*\n", text)
    return [" ".join(p.split()) for p in parts if p.strip()]


def _drop_repeats(paragraphs: list[str], min_len: int = 80) -> list[str]:
    """Drop paragraphs that repeat an earlier one (keeping short boilerplate like "Note:").

    Several pydoc topics share whole sections (the data-model pages appear under more than
    one key); without this ~10 % of passages are exact copies and any train / held-out
    split leaks text between its parts.
    """
    seen: set[str] = set()
    out = []
    for para in paragraphs:
        if len(para) >= min_len and para in seen:
            continue
        seen.add(para)
        out.append(para)
    return out


def _passages(paragraphs: list[str], min_chars: int, max_chars: int) -> list[str]:
    """Greedily join paragraphs into passages of at least ``min_chars`` characters."""
    passages, current = [], ""
    for para in paragraphs:
        para = para[:max_chars]
        current = f"{current}\n\n{para}" if current else para
        if len(current) >= min_chars:
            passages.append(current[:max_chars])
            current = ""
    if current:
        passages.append(current)
    return passages


def load_corpus(
    name: str | os.PathLike = "pydoc",
    n: int | None = None,
    min_chars: int = 600,
    max_chars: int = 4000,
) -> list[str]:
    """Passages of English text, deterministic.

        >>> texts = sl.load_corpus()                  # pydoc topics, ~450 passages
        >>> texts = sl.load_corpus("notes.txt", n=20) # your own text file

    ``name`` is ``"pydoc"`` or a path to a UTF-8 text file (split on blank lines).
    ``n`` keeps the first ``n`` passages. Paragraphs repeating an earlier one are dropped,
    so no two passages share a long paragraph.
    """
    if n is not None and n < 0:
        raise ValueError(f"n must be >= 0 (or None for all passages), got {n}")
    if str(name) == "pydoc":
        from pydoc_data.topics import topics

        paragraphs = [p for key in sorted(topics) for p in _paragraphs(topics[key])]
    else:
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(
                f"corpus {str(name)!r} is neither a known corpus {CORPORA} nor a text file"
            )
        paragraphs = _paragraphs(path.read_text(encoding="utf-8"))
    passages = _passages(_drop_repeats(paragraphs), min_chars, max_chars)
    if not passages:
        raise ValueError(f"corpus {str(name)!r} holds no text")
    return passages[:n] if n is not None else passages


def split(texts: list[str], held_out: float = 0.25) -> tuple[list[str], list[str]]:
    """Deterministic train / held-out split: passages are held out at evenly spaced indices.

        >>> train, held_out = split(texts, held_out=0.25)    # every 4th passage held out

    Interleaving (rather than a head/tail cut) keeps both parts drawn from all topics.
    Passage ``i`` is held out when ``floor((i + 1) * held_out)`` steps up, so any fraction
    (not only 1/k) is honoured to within one passage.
    """
    if not 0.0 < held_out < 1.0:
        raise ValueError(f"held_out must be in (0, 1), got {held_out}")
    eps = 1e-9  # so that e.g. 0.29 * 100 counts as 29, not 28.999...
    held = [
        int((i + 1) * held_out + eps) > int(i * held_out + eps) for i in range(len(texts))
    ]
    test = [t for t, h in zip(texts, held, strict=True) if h]
    train = [t for t, h in zip(texts, held, strict=True) if not h]
    return train, test
