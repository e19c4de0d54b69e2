"""Find the gated MLP of every decoder layer by structure, whatever the architecture.

    >>> adapter = sl.models.adapter_for(model)
    >>> adapter.activation, adapter.n_layers, adapter.layers[0].gate_proj
    ('silu', 30, Linear(in_features=576, out_features=1536, bias=False))

A gated MLP is a child module of a decoder layer holding three linear projections
(``gate_proj``/``up_proj``/``down_proj``, or ``w1``/``w3``/``w2``) or a fused gate+up
projection (``gate_up_proj``, gate rows first, as Phi-3 and GLM) and an activation, and
computing ``down(act(gate(x)) * up(x))``. The decoder layers are the first ``ModuleList``
of the model whose every element holds one. The activation is the function the module
really applies (found by evaluating it on a grid), so a config field renamed between
transformers versions cannot mislead it; then the first layer's MLP is run once on a
random input and compared with the formula, so a module with an extra step (a norm inside
the MLP, as BitNet's) is refused instead of being sparsified wrongly.

The layer's input norm (``input_layernorm``, read by lookahead predictors) is optional:
models that normalise after attention only (OLMo 2, EXAONE 4) record the decoder layer's
input itself as ``layer_in``.
"""

from __future__ import annotations

import copy
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "ACTIVATIONS",
    "SUPPORTED",
    "LayerMLP",
    "ModelAdapter",
    "UnsupportedModelError",
    "activation_module",
    "adapter_for",
    "decoder_layers",
    "find_gated_mlp",
    "model_identity",
]


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.gelu(x, approximate="tanh")


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": torch.nn.functional.silu,
    "gelu_tanh": _gelu_tanh,
    "relu": torch.relu,
    "gelu": torch.nn.functional.gelu,
}

# HF config names of activations -> sparselab's names (used when a module has no
# activation attribute to probe)
_HF_ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "relu": "relu",
    "gelu": "gelu",
}

# Architectures whose tiny random-init models the test suite records, sparsifies and
# restores (tests/test_architectures.py). Others with the same structure work too.
SUPPORTED: tuple[str, ...] = (
    "cohere", "exaone4", "gemma", "gemma2", "gemma3_text", "glm", "granite", "helium",
    "llama", "mistral", "olmo", "olmo2", "phi3", "qwen2", "qwen3", "stablelm",
)

# projection names of a gated MLP: separate (gate, up, down) or fused (gate_up, down)
_SEPARATE = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))
_FUSED = (("gate_up_proj", "down_proj"),)
_ACTIVATION_ATTRS = ("act_fn", "activation_fn", "act", "activation")
_INPUT_NORMS = ("input_layernorm",)


class UnsupportedModelError(TypeError):
    """Raised for a model with no gated MLP that sparselab can find and verify."""


@dataclass(frozen=True)
class LayerMLP:
    """Handles on one decoder layer's gated MLP: ``down(act(gate(x)) * up(x))``.

    ``attr`` is the MLP's attribute name in ``layer`` (where the runtime swaps in its
    wrapper); ``projections`` the names of its linear children, gate first (two names
    when gate and up are fused). ``input_norm`` is None for models without one.
    """

    index: int
    layer: nn.Module
    mlp: nn.Module
    input_norm: nn.Module | None
    fused_gate_up: bool
    attr: str = "mlp"
    projections: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")

    @property
    def gate_proj(self) -> nn.Module:
        """The module whose output holds the gate pre-activations (fused: gate + up)."""
        return getattr(self.mlp, self.projections[0])

    @property
    def up_proj(self) -> nn.Module | None:
        """The up projection (None when fused into :attr:`gate_proj`)."""
        return None if self.fused_gate_up else getattr(self.mlp, self.projections[1])

    @property
    def down_proj(self) -> nn.Module:
        return getattr(self.mlp, self.projections[-1])

    @property
    def n_neurons(self) -> int:
        return self.down_proj.in_features

    def gate_up_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate, up) weights, each ``[neurons, hidden]`` (views, not copies)."""
        if self.fused_gate_up:
            w = self.gate_proj.weight
            return w[: self.n_neurons], w[self.n_neurons :]
        return self.gate_proj.weight, self.up_proj.weight

    def split_gate_output(self, out: torch.Tensor) -> torch.Tensor:
        """Gate pre-activations from the output of :attr:`gate_proj`."""
        return out[..., : self.n_neurons] if self.fused_gate_up else out

    @property
    def has_bias(self) -> bool:
        """Whether any projection of the MLP has a bias (the sparse kernels have none)."""
        return any(getattr(self.mlp, name).bias is not None for name in self.projections)


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

    @property
    def hidden_size(self) -> int:
        return self.layers[0].down_proj.out_features


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _is_linear(module) -> bool:
    return isinstance(module, nn.Linear)


def find_gated_mlp(layer: nn.Module) -> tuple[str, nn.Module, tuple[str, ...], bool] | None:
    """``(attribute, module, projection names, fused)`` of the gated MLP among the children
    of a decoder layer, or None. A sparselab runtime wrapper counts (it keeps the
    projections under their names)."""
    for attr, child in layer.named_children():
        for names in _SEPARATE:
            if all(_is_linear(getattr(child, n, None)) for n in names):
                return attr, child, names, False
        for names in _FUSED:
            if all(_is_linear(getattr(child, n, None)) for n in names):
                return attr, child, names, True
    return None


def _unsupported(model: nn.Module, why: str) -> UnsupportedModelError:
    config = _text_config(getattr(model, "config", None))
    model_type = getattr(config, "model_type", None)
    return UnsupportedModelError(
        f"{type(model).__name__} (model_type={model_type!r}) is not supported: {why}. "
        f"sparselab finds gated MLPs (gate_proj/up_proj/down_proj, w1/w3/w2 or a fused "
        f"gate_up_proj, with an activation) in the decoder layers of any model; tested on: "
        f"{', '.join(SUPPORTED)}"
    )


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's decoder layers: its first ``ModuleList`` whose every element holds a
    gated MLP (:class:`UnsupportedModelError` when there is none)."""
    partial = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or not len(module):
            continue
        found = [find_gated_mlp(layer) is not None for layer in module]
        if all(found):
            return module
        if any(found) and partial is None:
            partial = (name, [i for i, ok in enumerate(found) if not ok])
    if partial is not None:
        raise _unsupported(model, f"layers {partial[1]} of {partial[0]!r} have no gated MLP "
                                  "(mixture-of-experts or another block)")
    raise _unsupported(model, "no decoder layer holds a gated MLP")


def activation_module(mlp: nn.Module):
    """The callable a gated MLP applies as its activation (by attribute name), or None."""
    for attr in _ACTIVATION_ATTRS:
        fn = getattr(mlp, attr, None)
        if callable(fn):
            return fn
    return None


def _probe_activation(mlp: nn.Module) -> str | None:
    """Name of the activation ``mlp`` really applies, found by evaluating it on a grid.

    ``None`` when the module has no activation attribute to probe; ``"unknown"`` when it
    matches none of :data:`ACTIVATIONS` (exact GELU and its tanh form differ by ~5e-4).
    """
    fn = activation_module(mlp)
    if fn is None:
        return None
    x = torch.linspace(-6.0, 6.0, 241)
    with torch.no_grad():
        y = fn(x)
    for name, ref in ACTIVATIONS.items():
        if torch.allclose(y, ref(x), rtol=0.0, atol=1e-5):
            return name
    return "unknown"


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs",
               "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called")
_VERIFIED: weakref.WeakSet = weakref.WeakSet()  # MLP modules whose formula was checked


def _without_hooks(module: nn.Module) -> nn.Module:
    """A shallow copy of ``module`` and its children (weights shared) with no hooks, so a
    check run while a Recorder or a timer is attached records and times nothing."""
    clone = copy.copy(module)
    for name in _HOOK_DICTS:
        if name in module.__dict__:
            clone.__dict__[name] = OrderedDict()
    clone.__dict__["_modules"] = OrderedDict(
        (name, None if child is None else _without_hooks(child))
        for name, child in module._modules.items())
    return clone


def _verify_formula(spec: LayerMLP, act: Callable, model: nn.Module) -> None:
    """Run the MLP once on a small random input and compare with down(act(gate) * up)."""
    weight = spec.down_proj.weight
    if (weight.device.type == "meta" or spec.mlp in _VERIFIED
            or getattr(spec.mlp, "is_sparselab_wrapper", False)):
        return
    mlp = _without_hooks(spec.mlp)
    gate_proj, down_proj = getattr(mlp, spec.projections[0]), getattr(mlp, spec.projections[-1])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, down_proj.out_features, generator=g).to(weight.dtype).to(weight.device)
    with torch.no_grad():
        got = mlp(x)
        out = gate_proj(x)
        gate = spec.split_gate_output(out)
        up = out[..., spec.n_neurons:] if spec.fused_gate_up else getattr(mlp, spec.projections[1])(x)
        want = down_proj(act(gate) * up)
    tol = 1e-2 if weight.dtype in (torch.float16, torch.bfloat16) else 1e-4
    if got.shape != want.shape or not torch.allclose(got.float(), want.float(), rtol=tol, atol=tol):
        extra = [n for n, _ in spec.mlp.named_children()
                 if n not in spec.projections and n not in _ACTIVATION_ATTRS]
        raise _unsupported(model, f"the MLP of layer {spec.index} ({type(spec.mlp).__name__}) "
                                  f"does not compute down(act(gate(x)) * up(x))"
                                  + (f"; it has extra parts {extra}" if extra else ""))
    _VERIFIED.add(spec.mlp)


def adapter_for(model: nn.Module) -> ModelAdapter:
    """Describe the gated MLPs of ``model``; raises :class:`UnsupportedModelError` naming the
    model's class, what is missing, and the tested architectures."""
    config = _text_config(getattr(model, "config", None))
    model_type = getattr(config, "model_type", None) or type(model).__name__
    layers = []
    for i, layer in enumerate(decoder_layers(model)):
        attr, mlp, names, fused = find_gated_mlp(layer)
        norm = next((getattr(layer, n) for n in _INPUT_NORMS if isinstance(getattr(layer, n, None), nn.Module)), None)
        layers.append(LayerMLP(i, layer, mlp, norm, fused, attr, names))
    # the MLP module is the truth: which config field Gemma reads (hidden_act or
    # hidden_activation) has changed between transformers versions
    activation = _probe_activation(layers[0].mlp)
    hf_act = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None)
    if activation is None and hf_act in _HF_ACTIVATIONS:
        activation = _HF_ACTIVATIONS[hf_act]
    if activation not in ACTIVATIONS:
        act_module = activation_module(layers[0].mlp)
        raise UnsupportedModelError(
            f"the MLP activation of {type(model).__name__} ({type(act_module).__name__}, "
            f"config: {hf_act!r}) is not supported; sparselab knows: "
            f"{', '.join(ACTIVATIONS)} (HF names: {', '.join(sorted(_HF_ACTIVATIONS))})"
        )
    _verify_formula(layers[0], ACTIVATIONS[activation], model)
    return ModelAdapter(str(model_type), activation, tuple(layers))


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
