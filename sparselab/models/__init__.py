"""Models: load them offline, find their gated MLPs by structure, and the embedded text.

    >>> model, tokenizer = sl.load_model()            # embedded SmolLM2-135M-Instruct, fp32
    >>> adapter = sl.models.adapter_for(model)        # where every layer's gated MLP is
    >>> texts = sl.load_corpus()                      # embedded English text

Modules: :mod:`.loading` (embedded models, the fp32 cache, any local HF folder),
:mod:`.adapters` (gated MLPs found by structure), :mod:`.corpus` (the embedded text),
:mod:`.random` (random-weight models of any Llama shape, for speed benchmarks).
"""

from sparselab.models.adapters import (
    ACTIVATIONS,
    SUPPORTED,
    LayerMLP,
    ModelAdapter,
    UnsupportedModelError,
    activation_module,
    adapter_for,
    decoder_layers,
    find_gated_mlp,
    model_identity,
)
from sparselab.models.loading import (
    DEFAULT_MODEL,
    EMBEDDED,
    EmbeddedModel,
    cache_dir,
    embedded_gguf_path,
    embedded_model_dir,
    load_model,
)

__all__ = [
    "ACTIVATIONS",
    "DEFAULT_MODEL",
    "EMBEDDED",
    "SUPPORTED",
    "EmbeddedModel",
    "LayerMLP",
    "ModelAdapter",
    "UnsupportedModelError",
    "activation_module",
    "adapter_for",
    "cache_dir",
    "decoder_layers",
    "embedded_gguf_path",
    "embedded_model_dir",
    "find_gated_mlp",
    "load_model",
    "model_identity",
]
