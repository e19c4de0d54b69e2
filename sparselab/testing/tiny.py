"""Tiny random Llama models for tests and examples: seconds to build, no download.

    >>> from sparselab.testing.tiny import tiny_llama
    >>> model = tiny_llama(vocab_size=100, hidden_size=32, intermediate_size=48, num_layers=3)
    >>> model.model.layers[0].mlp.gate_proj.weight.shape
    torch.Size([48, 32])
    >>> word_tokenizer(100)("w3 w4").input_ids
    [3, 4]
"""

from __future__ import annotations

from typing import Any

import torch


def tiny_llama(*, vocab_size: int, hidden_size: int = 64, intermediate_size: int = 160,
               num_layers: int = 2, seed: int = 0, **config: Any):
    """A seeded, randomly initialised ``LlamaForCausalLM`` in eval mode.

    Four attention heads over two key/value heads (grouped-query attention, as in the
    models sparselab targets) and 128 positions unless ``config`` says otherwise; any other
    ``LlamaConfig`` field (``initializer_range``, ``pad_token_id``, ...) passes through.
    The same arguments give bitwise the same weights.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    settings = {"num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
                **config}
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size,
                      intermediate_size=intermediate_size, num_hidden_layers=num_layers, **settings)
    return LlamaForCausalLM(cfg).eval()


#: the special ids of :func:`word_tokenizer` for :func:`tiny_llama`'s config:
#: ``tiny_llama(vocab_size=100, **WORD_TOKEN_IDS)`` pads and stops as the tokenizer does
WORD_TOKEN_IDS = {"pad_token_id": 0, "bos_token_id": None, "eos_token_id": 2}


def word_tokenizer(vocab_size: int):
    """A word-level tokenizer built in memory for :func:`tiny_llama`'s vocabulary:
    ``"wN"`` -> id N, ``[PAD]`` = 0, ``[UNK]`` = 1, ``[EOS]`` = 2 (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", eos_token="[EOS]",
                                   unk_token="[UNK]")
