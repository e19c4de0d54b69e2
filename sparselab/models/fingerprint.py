"""Weight fingerprints: tell one model's weights from another's of the same shapes.

    >>> fp = mlp_fingerprint(model)            # saved with predictors (and in trace meta)
    >>> fingerprint_diffs(fp, mlp_fingerprint(other_model))
    'layer 0 gate (distance 1.41), layer 0 up (distance 1.39), ...'
    >>> weight_fingerprint(model)              # exact digest (Zarr resume): '3f9c0e...'

Two kinds, for two questions:

- :func:`weight_fingerprint` is exact: a digest of samples of every parameter's values. A
  streamed recording resumes only with bitwise the same model.
- :func:`mlp_fingerprint` tolerates rounding: artefacts such as predictors stay valid for
  the same weights in bfloat16, or quantized to int8 by ``sl.sparsify(weights="int8")``.
  Per layer and gated-MLP matrix ``W`` (gate, up, down as ``[neurons, hidden]``) it keeps
  its RMS and ``PROBES`` bilinear probes ``a_k^T W b_k / sqrt(N H)`` with fixed random sign
  vectors ``a_k``, ``b_k`` (float32). A probe sums every weight with a random sign, so
  rounding errors largely cancel: the probes move by about the weights' relative rounding
  error (bf16 ~0.1 %, int8 per block ~1 %, int8 per row ~2-3 % of the RMS), while for
  other weights they differ by ~140 %. :func:`fingerprint_diffs` flags a matrix whose
  probes moved by more than ``TOLERANCE`` (10 %) of its saved RMS. It detects other
  weights (another checkpoint, a re-initialisation, changes of more than ~10 % of the RMS),
  not small edits of a few weights.

Layers whose weights are not in memory (``sparsify(weight_file=...)`` drops them) are left
out of a fingerprint and so out of a comparison.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import torch
from torch import nn

__all__ = ["PROBES", "TOLERANCE", "check_fingerprint", "fingerprint_diffs", "mlp_fingerprint",
           "weight_fingerprint"]

FINGERPRINT_VERSION = 1
PROBES = 8
TOLERANCE = 0.10
_ROLES = ("gate", "up", "down")


def weight_fingerprint(model: nn.Module) -> str:
    """Exact digest of a sample of every parameter's values (same shapes, other weights differ).

        >>> weight_fingerprint(model)      # '3f9c0e...' (20 hex digits)
    """
    h = hashlib.sha1()
    with torch.no_grad():
        for name, p in model.named_parameters():
            flat = p.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 256)][:256].float().cpu().numpy()
            h.update(name.encode())
            h.update(str(tuple(p.shape)).encode())
            h.update(sample.tobytes())
    return h.hexdigest()[:20]


def _signs(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (PROBES, n), generator=g).to(torch.float32) * 2 - 1


def _summary(w: torch.Tensor, seed: int) -> list[float]:
    """``[rms, probe_1, ..., probe_K]`` of one ``[N, H]`` matrix (6 significant digits)."""
    w = w.detach().to(device="cpu", dtype=torch.float32)
    n, h = w.shape
    a, b = _signs(n, seed), _signs(h, seed + 1)
    probes = ((a @ w) * b).sum(1) / math.sqrt(n * h)
    rms = float(torch.linalg.vector_norm(w)) / math.sqrt(n * h)  # no temporary copy of w
    return [float(f"{v:.6g}") for v in (rms, *probes.tolist())]


def mlp_fingerprint(model: nn.Module) -> dict[str, Any]:
    """Rounding-tolerant fingerprint of the gated MLP weights of ``model`` (JSON-able).

        >>> fp = mlp_fingerprint(model)
        >>> fp["layers"]["0"]["gate"]          # [rms, probe_1, ..., probe_8]

    See the module docstring for what it keeps and what it detects.
    """
    from sparselab.models.adapters import adapter_for

    layers = {}
    with torch.no_grad():
        for spec in adapter_for(model).layers:
            gate, up = spec.gate_up_weights()
            down = spec.down_proj.weight
            if min(gate.numel(), up.numel(), down.numel()) == 0:  # weights on disk
                continue
            matrices = {"gate": gate, "up": up, "down": down.T}
            layers[str(spec.index)] = {
                role: _summary(w, 1000 * spec.index + 10 * k)
                for k, (role, w) in enumerate(matrices.items())
            }
    return {"version": FINGERPRINT_VERSION, "probes": PROBES, "layers": layers}


def check_fingerprint(fp: Any) -> None:
    """``ValueError`` unless ``fp`` has the structure :func:`mlp_fingerprint` returns.

        >>> check_fingerprint(json.loads(text)["model"]["mlp_fingerprint"])
    """
    if not isinstance(fp, dict) or not isinstance(fp.get("layers"), dict):
        raise ValueError("a fingerprint is an object with 'version', 'probes' and 'layers'")
    if fp.get("version") != FINGERPRINT_VERSION or fp.get("probes") != PROBES:
        raise ValueError(f"fingerprint version {fp.get('version')!r} with {fp.get('probes')!r} "
                         f"probes is not the version {FINGERPRINT_VERSION} this sparselab reads")
    for layer, roles in fp["layers"].items():
        if not str(layer).isdigit() or not isinstance(roles, dict) or set(roles) != set(_ROLES):
            raise ValueError(f"fingerprint layer {layer!r} must map gate, up and down to numbers")
        for role, values in roles.items():
            if (not isinstance(values, list) or len(values) != PROBES + 1
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                               and math.isfinite(v) for v in values)):
                raise ValueError(f"fingerprint layer {layer} {role} must be {PROBES + 1} finite numbers")


def fingerprint_diffs(saved: dict[str, Any], current: dict[str, Any],
                      tolerance: float = TOLERANCE) -> str:
    """The MLP matrices whose weights differ between two :func:`mlp_fingerprint` s, as a
    readable list ("" when they match within ``tolerance`` of the saved RMS).

        >>> fingerprint_diffs(mlp_fingerprint(model), mlp_fingerprint(model.to(torch.bfloat16)))
        ''
    """
    check_fingerprint(saved)
    check_fingerprint(current)
    diffs = []
    for layer in sorted(set(saved["layers"]) & set(current["layers"]), key=int):
        for role in _ROLES:
            (rms_a, *a), (rms_b, *b) = saved["layers"][layer][role], current["layers"][layer][role]
            scale = max(abs(rms_a), 1e-12)
            distance = math.sqrt(sum((x - y) ** 2 for x, y in zip(a, b, strict=True)) / len(a)) / scale
            distance = max(distance, abs(rms_a - rms_b) / scale)
            if distance > tolerance:
                diffs.append(f"layer {layer} {role} (distance {distance:.3g})")
    return ", ".join(diffs)
