"""Random-weight models of any Llama shape, for speed benchmarks (nothing downloaded).

    >>> model = build_random_llama({"llama_config": {"hidden_size": 3072, ...}, "num_hidden_layers": 4})
    >>> fill_uniform_tiled_(weight, scale=0.02, generator=torch.Generator().manual_seed(0))

Decode speed does not depend on the values of the weights, only on their shapes and
dtype, so a random model of a 3B model's shapes measures what the 3B model would.
"""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["build_random_llama", "fill_uniform_tiled_"]


def fill_uniform_tiled_(t: torch.Tensor, scale: float, generator: torch.Generator) -> None:
    """Fill ``t`` in place with uniform(-scale, scale) values tiled from one random block.

    Random numbers cost ~30x a copy, and a benchmark's speed does not depend on the
    values; the block's odd length keeps consecutive rows from repeating each other.
    """
    flat = t.detach().view(-1)
    block = torch.empty(min(flat.numel(), (1 << 20) + 7), dtype=t.dtype)
    block.uniform_(-scale, scale, generator=generator)
    for start in range(0, flat.numel(), block.numel()):
        stop = min(flat.numel(), start + block.numel())
        flat[start:stop].copy_(block[: stop - start])


def build_random_llama(spec: dict[str, Any]):
    """``LlamaForCausalLM`` with the spec's shapes and random weights (tiled, seeded).

        >>> build_random_llama({"llama_config": {...}, "num_hidden_layers": 2, "dtype": "float32"})

    ``spec``: ``llama_config`` (``LlamaConfig`` fields; ``full_num_hidden_layers`` is
    ignored here), ``num_hidden_layers``, ``dtype``, ``seed``, ``init_scale`` (std of the
    weights). HF's initialisation draws ~1 G normal numbers for a 3B-shaped model (tens of
    seconds); skipping it and tiling one random block is a copy. Norm weights stay 1, the
    LM head is tied when the config says so.
    """
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.initialization import no_init_weights

    fields = {k: v for k, v in spec["llama_config"].items() if k != "full_num_hidden_layers"}
    fields["num_hidden_layers"] = int(spec.get("num_hidden_layers", fields.get("num_hidden_layers", 2)))
    dtype = getattr(torch, spec.get("dtype", "float32"))
    cfg = LlamaConfig(**fields)
    with no_init_weights():
        model = LlamaForCausalLM(cfg)
    if cfg.tie_word_embeddings:
        model.tie_weights()
    model = model.to(dtype).eval()
    g = torch.Generator().manual_seed(int(spec.get("seed", 0)))
    scale = float(spec.get("init_scale", 0.02)) * math.sqrt(3.0)  # uniform with that std
    with torch.no_grad():
        for p in {id(p): p for p in model.parameters()}.values():
            if p.dim() == 2:
                fill_uniform_tiled_(p, scale, g)
    model.config.sparselab_name = f"random-llama-{fields['num_hidden_layers']}L"
    model.generation_config.pad_token_id = 0
    return model
