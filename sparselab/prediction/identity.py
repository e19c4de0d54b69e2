"""Which model predictors belong to: identities compared field by field.

    >>> identity_diffs(predictors.model, sl.models.model_identity(model))
    'hidden_size 576 != 640'
"""

from __future__ import annotations

from typing import Any

__all__ = ["IDENTITY_KEYS", "PredictorModelMismatch", "identity_diffs"]

IDENTITY_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers")


class PredictorModelMismatch(ValueError):
    """Predictors loaded or used with a model they were not trained for."""


def identity_diffs(a: dict[str, Any], b: dict[str, Any]) -> str:
    """Human-readable differences between two model identities (keys both know)."""
    diffs = [
        f"{key} {a[key]!r} != {b[key]!r}"
        for key in IDENTITY_KEYS
        if a.get(key) is not None and b.get(key) is not None and a[key] != b[key]
    ]
    return ", ".join(diffs)
