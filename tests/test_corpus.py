"""The embedded corpus (sparselab.corpus): deterministic passages, file input, train/held-out split.

    pytest -q tests/test_corpus.py
"""

from __future__ import annotations

import pytest

from sparselab.models.corpus import load_corpus, split


def test_pydoc_corpus_is_deterministic_and_non_empty():
    texts = load_corpus()
    assert texts == load_corpus("pydoc")
    assert len(texts) > 100
    assert all(isinstance(t, str) and t.strip() for t in texts)
    assert all(len(t) <= 4000 for t in texts)
    # every passage but possibly the last reaches min_chars
    assert all(len(t) >= 600 for t in texts[:-1])
    # pydoc repeats whole sections under several topics: no passage may be a copy of
    # another, and no long paragraph may appear twice (a split would leak it)
    assert len(set(texts)) == len(texts)
    long_paragraphs = [p for t in texts for p in t.split("\n\n") if len(p) >= 80]
    assert len(set(long_paragraphs)) == len(long_paragraphs)


def test_n_keeps_the_first_passages():
    texts = load_corpus()
    assert load_corpus(n=5) == texts[:5]
    assert load_corpus(n=10**6) == texts


def test_negative_n_is_an_error():
    with pytest.raises(ValueError, match="n must be"):
        load_corpus(n=-1)


def test_passage_lengths_follow_parameters():
    texts = load_corpus(min_chars=2000, max_chars=2500)
    assert all(len(t) <= 2500 for t in texts)
    assert all(len(t) >= 2000 for t in texts[:-1])
    assert len(texts) < len(load_corpus())


def test_text_file(tmp_path):
    path = tmp_path / "notes.txt"
    paragraphs = [f"Paragraph {i} " + "word " * 30 for i in range(10)]
    path.write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    texts = load_corpus(path, min_chars=300)
    # ~155 characters per paragraph: two paragraphs per passage, order and text kept
    assert len(texts) == 5
    assert texts[0] == " ".join(paragraphs[0].split()) + "\n\n" + " ".join(paragraphs[1].split())
    assert load_corpus(str(path), min_chars=300) == texts
    assert load_corpus(path, n=2, min_chars=300) == texts[:2]


def test_missing_file_error(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load_corpus(missing)
    with pytest.raises(FileNotFoundError, match="neither a known corpus"):
        load_corpus("not-a-corpus")


def test_repeated_paragraphs_in_a_file_are_dropped(tmp_path):
    long = "A long paragraph that a document repeats word for word in two places. " * 2
    path = tmp_path / "rep.txt"
    path.write_text(f"{long}\n\nNote:\n\nfirst\n\n{long}\n\nNote:\n\nsecond\n")
    texts = load_corpus(path, min_chars=10_000)
    assert texts == [f"{long.strip()}\n\nNote:\n\nfirst\n\nNote:\n\nsecond"]


def test_empty_file_error(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("\n\n   \n")
    with pytest.raises(ValueError, match="holds no text"):
        load_corpus(path)


@pytest.mark.parametrize("held_out", [0.1, 0.25, 0.3, 0.5, 0.75])
def test_split_is_disjoint_covering_and_sized(held_out):
    texts = [f"passage {i}" for i in range(101)]
    train, test = split(texts, held_out=held_out)
    assert not set(train) & set(test)
    assert sorted(train + test, key=lambda t: int(t.split()[1])) == texts
    # order within each part is kept
    assert train == sorted(train, key=lambda t: int(t.split()[1]))
    assert test == sorted(test, key=lambda t: int(t.split()[1]))
    assert abs(len(test) - held_out * len(texts)) <= 1
    # interleaved: the held-out part is drawn from the whole corpus, not one end
    ids = [int(t.split()[1]) for t in test]
    assert min(ids) < 0.25 * len(texts) and max(ids) > 0.75 * len(texts)
    assert split(texts, held_out=held_out) == (train, test)


def test_split_quarter_is_every_fourth():
    train, test = split([str(i) for i in range(8)], held_out=0.25)
    assert test == ["3", "7"] and train == ["0", "1", "2", "4", "5", "6"]


def test_split_of_the_real_corpus():
    texts = load_corpus()
    train, test = split(texts, held_out=0.25)
    assert len(train) + len(test) == len(texts) and train and test
    assert not set(train) & set(test)


@pytest.mark.parametrize("held_out", [0.0, 1.0, -0.1, 1.5])
def test_split_invalid_fraction(held_out):
    with pytest.raises(ValueError, match="held_out must be in"):
        split(["a", "b"], held_out=held_out)
