"""How a predictor's scores become a mask: a target density, a target recall, or top-k.

    >>> Policy.from_kwargs(target_density=0.3)
    Policy(kind='density', value=0.3)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Policy"]


@dataclass(frozen=True)
class Policy:
    """How scores become a mask: ``kind`` in {"density", "recall", "top_k"} and its value.

        >>> Policy.from_kwargs(target_density=0.3)
        Policy(kind='density', value=0.3)

    ``density``/``recall`` choose one threshold per layer on the calibration tokens;
    ``top_k`` keeps the ``value`` best scores of every token (an int count, or a float
    fraction of the neurons).
    """

    kind: str
    value: float

    def __post_init__(self) -> None:
        if self.kind not in ("density", "recall", "top_k"):
            raise ValueError(f"unknown policy {self.kind!r}; expected density, recall or top_k")
        if self.kind == "top_k":
            if isinstance(self.value, bool) or not (
                (isinstance(self.value, (int, np.integer)) and self.value >= 0)
                or (isinstance(self.value, float) and 0.0 <= self.value <= 1.0)
            ):
                raise ValueError(
                    f"top_k must be an int count >= 0 or a float fraction in [0, 1], got {self.value!r}"
                )
        elif not 0.0 <= float(self.value) <= 1.0:
            raise ValueError(f"target_{self.kind} must be in [0, 1], got {self.value}")

    @classmethod
    def from_kwargs(
        cls,
        target_recall: float | None = None,
        target_density: float | None = None,
        top_k: int | float | None = None,
        default: Policy | None = None,
    ) -> Policy | None:
        given = {
            k: v
            for k, v in (("recall", target_recall), ("density", target_density), ("top_k", top_k))
            if v is not None
        }
        if len(given) > 1:
            raise ValueError(
                f"give at most one of target_recall, target_density, top_k (got {sorted(given)})"
            )
        if not given:
            return default
        kind, value = next(iter(given.items()))
        return cls(kind, value if kind == "top_k" else float(value))

    @property
    def needs_threshold(self) -> bool:
        return self.kind != "top_k"

    def count(self, n_neurons: int) -> int:
        """Neurons kept per token by a ``top_k`` policy."""
        if isinstance(self.value, float):
            return int(round(self.value * n_neurons))
        return min(int(self.value), n_neurons)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "value": self.value}

    @property
    def label(self) -> str:
        name = "top_k" if self.kind == "top_k" else f"target_{self.kind}"
        return f"{name}={self.value:g}"
