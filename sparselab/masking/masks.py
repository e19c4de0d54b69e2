"""Binary neuron masks for every recorded token and layer, stored as packed bits.

    >>> masks = trace.masks(sl.rules.TopK(keep=0.5))
    >>> masks.layer(3).shape            # bool [tokens, neurons] of layer 3
    >>> masks.bits.shape                # uint64 [layers, tokens, words], what _fast consumes

A ``Masks`` object carries the token metadata it needs for sequence-aware metrics
(sequence ids, positions) so that churn never crosses from one text to the next.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sparselab._fast.masks import n_words, pack, popcount, unpack

__all__ = ["Masks", "as_masks"]


@dataclass(frozen=True)
class Masks:
    """Packed masks ``bits[layer_index, token, word]`` plus the metadata to read them.

    ``layers`` lists the model's layer numbers in the order of the first axis of ``bits``;
    ``seq_ids`` and ``positions`` give, per token, the sequence it belongs to and its
    position there. ``rule`` is a JSON-able description of the rule that produced them.
    """

    bits: np.ndarray
    n_neurons: int
    layers: tuple[int, ...]
    seq_ids: np.ndarray
    positions: np.ndarray
    rule: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        bits = np.ascontiguousarray(self.bits, dtype=np.uint64)
        if bits.ndim != 3:
            raise ValueError(f"bits must be [layers, tokens, words], got shape {bits.shape}")
        if bits.shape[0] != len(self.layers):
            raise ValueError(f"bits has {bits.shape[0]} layers but layers lists {len(self.layers)}")
        if bits.shape[2] != n_words(self.n_neurons):
            raise ValueError(
                f"bits has {bits.shape[2]} words per mask, {self.n_neurons} neurons need "
                f"{n_words(self.n_neurons)}"
            )
        if len(set(self.layers)) != len(self.layers):
            raise ValueError(f"layers must be distinct, got {list(self.layers)}")
        tail = self.n_neurons % 64
        if tail and bits.size and (bits[..., -1] >> np.uint64(tail)).any():
            # bits past the last neuron would silently inflate counts() and density()
            raise ValueError(f"bits has set bits past neuron {self.n_neurons - 1}")
        for name in ("seq_ids", "positions"):
            arr = np.asarray(getattr(self, name), dtype=np.int64)
            if arr.shape != (bits.shape[1],):
                raise ValueError(f"{name} must have one entry per token ({bits.shape[1]})")
            object.__setattr__(self, name, arr)
        object.__setattr__(self, "bits", bits)
        object.__setattr__(self, "layers", tuple(int(x) for x in self.layers))

    # -- construction -------------------------------------------------------------------
    @classmethod
    def from_bool(
        cls,
        dense: np.ndarray,
        layers: list[int] | tuple[int, ...] | None = None,
        seq_ids: np.ndarray | None = None,
        positions: np.ndarray | None = None,
        rule: dict[str, Any] | None = None,
    ) -> Masks:
        """Build from a boolean array ``[layers, tokens, neurons]`` (or ``[tokens, neurons]``).

        Without ``seq_ids``/``positions`` all tokens form one sequence in order.
        """
        dense = np.asarray(dense, dtype=bool)
        if dense.ndim == 2:
            dense = dense[None]
        if dense.ndim != 3:
            raise ValueError(f"expected [layers, tokens, neurons], got shape {dense.shape}")
        n_layers, n_tokens, n_neurons = dense.shape
        if seq_ids is None:
            seq_ids = np.zeros(n_tokens, dtype=np.int64)
        if positions is None:
            positions = np.arange(n_tokens, dtype=np.int64)
        return cls(
            bits=pack(dense),
            n_neurons=n_neurons,
            layers=tuple(range(n_layers)) if layers is None else tuple(layers),
            seq_ids=seq_ids,
            positions=positions,
            rule=dict(rule or {}),
        )

    # -- shape --------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return self.bits.shape[0]

    @property
    def n_tokens(self) -> int:
        return self.bits.shape[1]

    def layer_index(self, layer: int) -> int:
        """Position in ``bits`` of model layer ``layer``; clear error when not recorded."""
        try:
            return self.layers.index(int(layer))
        except ValueError:
            raise KeyError(f"layer {layer} not in these masks (layers: {list(self.layers)})") from None

    # -- reading ------------------------------------------------------------------------
    def layer(self, layer: int) -> np.ndarray:
        """Boolean ``[tokens, neurons]`` mask of model layer ``layer``."""
        return unpack(self.bits[self.layer_index(layer)], self.n_neurons)

    def layer_bits(self, layer: int) -> np.ndarray:
        """Packed ``[tokens, words]`` uint64 mask of model layer ``layer`` (a view)."""
        return self.bits[self.layer_index(layer)]

    def to_bool(self) -> np.ndarray:
        """Boolean ``[layers, tokens, neurons]`` array (memory: 1 byte per bit)."""
        return unpack(self.bits, self.n_neurons)

    def counts(self) -> np.ndarray:
        """Active neurons per layer and token, int64 ``[layers, tokens]``."""
        return np.asarray(popcount(self.bits), dtype=np.int64)

    def neuron_counts(self) -> np.ndarray:
        """Tokens in which each neuron is active, int64 ``[layers, neurons]``."""
        if not self.n_layers:
            return np.zeros((0, self.n_neurons), dtype=np.int64)
        return np.stack([unpack(self.bits[li], self.n_neurons).sum(axis=0, dtype=np.int64)
                         for li in range(self.n_layers)])

    def density(self) -> np.ndarray:
        """Share of active neurons per layer and token, float ``[layers, tokens]``."""
        return self.counts() / float(self.n_neurons)

    def select_tokens(self, index: np.ndarray) -> Masks:
        """Masks restricted to the given token indices (bool or int index), order kept."""
        index = np.asarray(index)
        return Masks(
            bits=self.bits[:, index],
            n_neurons=self.n_neurons,
            layers=self.layers,
            seq_ids=self.seq_ids[index],
            positions=self.positions[index],
            rule=self.rule,
        )

    def __repr__(self) -> str:
        mean = float(self.density().mean()) if self.n_tokens else float("nan")
        return (
            f"Masks(layers={self.n_layers}, tokens={self.n_tokens}, neurons={self.n_neurons}, "
            f"mean_density={mean:.3f}, rule={self.rule.get('name', '?')})"
        )


def as_masks(obj: Any, name: str = "masks") -> Masks:
    """``obj`` if it is a :class:`Masks`, else a ``TypeError`` saying how to make one."""
    if not isinstance(obj, Masks):
        raise TypeError(f"{name} must be sparselab.Masks (e.g. trace.masks(rule)), "
                        f"got {type(obj).__name__}")
    return obj
