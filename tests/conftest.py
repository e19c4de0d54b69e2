"""Shared fixtures: the real embedded model and a small trace of it, built once per session."""

from __future__ import annotations

import os

import pytest

# nothing in the test suite may reach a model hub: fail fast instead of hanging
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# executed notebooks (nbval's outputs) for the tests marked after_notebooks
pytest_plugins = ("sparselab.testing.notebook_capture",)


@pytest.fixture(scope="session")
def real_model():
    """(model, tokenizer) of the embedded SmolLM2-135M-Instruct, fp32, eval mode."""
    import sparselab as sl

    return sl.load_model()


@pytest.fixture(scope="session")
def small_trace(real_model):
    """A trace of the real model on 8 corpus passages, 64 tokens each (512 tokens)."""
    import sparselab as sl

    model, tokenizer = real_model
    return sl.record(model, tokenizer, sl.load_corpus(n=8), max_length=64, progress=False)


@pytest.fixture(scope="session")
def tokenizer():
    """The embedded model's tokenizer (no weights loaded), with a pad token. Test files
    that need another tokenizer (test_record: a word-level one) define their own."""
    from transformers import AutoTokenizer

    import sparselab as sl

    tok = AutoTokenizer.from_pretrained(str(sl.models.embedded_model_dir()))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


@pytest.fixture(scope="session")
def gemma_model():
    """(model, tokenizer) of the second embedded model, Gemma-3-270M, fp32 (converted from
    its GGUF chunk packages on the first load of a machine, ~1-3 min; cached after)."""
    import sparselab as sl

    return sl.load_model("gemma3-270m")


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a test module of tiny models: tiny matmuls are slower with 2
    OpenMP threads on a busy 2-core machine (spin-waits). Use with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
