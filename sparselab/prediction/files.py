"""Predictor files: a directory with ``predictors.safetensors`` (weights and score sketches)
and ``predictors.json`` (everything else, with the weights' checksum). No pickle.

    >>> save_predictors(predictors, "smollm2.predictors")    # == predictors.save(...)
    >>> load_predictors("smollm2.predictors", model=model)   # == sl.Predictors.load(...)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from sparselab.masking.rules import rule_from_dict
from sparselab.prediction.lowrank import Predictors
from sparselab.prediction.policy import Policy

__all__ = ["CONFIG_FILE", "FORMAT", "FORMAT_VERSION", "WEIGHTS_FILE", "PredictorFileError",
           "load_predictors", "save_predictors", "sha256_of"]

FORMAT = "sparselab.predictors"
FORMAT_VERSION = 1
CONFIG_FILE = "predictors.json"
WEIGHTS_FILE = "predictors.safetensors"


class PredictorFileError(ValueError):
    """A predictors directory that is missing, truncated, corrupted or not ours."""


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_predictors(predictors: Predictors, path: str | os.PathLike) -> Path:
    """Write ``predictors.safetensors`` + ``predictors.json`` into directory ``path``.

    Atomic: files go to a sibling temp directory which is then renamed into place.
    An existing directory is replaced only if it holds sparselab predictors.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.exists() and not (
        path.is_dir() and ((path / CONFIG_FILE).is_file() or not any(path.iterdir()))
    ):
        raise FileExistsError(f"{path} exists and is not a sparselab predictors directory")
    others = sorted(p.name for p in path.iterdir() if p.name not in (CONFIG_FILE, WEIGHTS_FILE)) \
        if path.is_dir() else []
    if others:  # replacing the directory would delete them
        raise FileExistsError(f"{path} holds other files too ({', '.join(others[:3])}"
                              f"{' ...' if len(others) > 3 else ''}): save the predictors elsewhere")
    tensors = {}
    for layer in predictors.layers:
        first, second, bias = predictors.layer_weights(layer)
        tensors[f"layer.{layer}.first.weight"] = first.contiguous()
        tensors[f"layer.{layer}.second.weight"] = second.contiguous()
        tensors[f"layer.{layer}.second.bias"] = bias.contiguous()
    for layer, (all_q, pos_q) in predictors.calibration.items():
        tensors[f"layer.{layer}.quantiles.all"] = all_q.contiguous()
        tensors[f"layer.{layer}.quantiles.positive"] = pos_q.contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    old = None
    try:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT})
        config = {"format": FORMAT, "version": FORMAT_VERSION, **predictors.describe()}
        config["sha256"] = {WEIGHTS_FILE: sha256_of(tmp / WEIGHTS_FILE)}
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=1, allow_nan=True))
        # mkdtemp makes a private (0700) directory; artefacts are meant to be shared
        for name in (WEIGHTS_FILE, CONFIG_FILE):
            os.chmod(tmp / name, 0o644)
        os.chmod(tmp, 0o755)
        if path.exists():
            old = path.parent / f".{path.name}.old-{os.getpid()}-{time.time_ns()}"
            os.replace(path, old)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not path.exists():
            os.replace(old, path)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return path


def load_predictors(path: str | os.PathLike, model=None) -> Predictors:
    """Read a directory written by :func:`save_predictors`; with ``model``, check it matches.

        >>> predictors = load_predictors("smollm2.predictors", model=model)
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    config_path, weights_path = path / CONFIG_FILE, path / WEIGHTS_FILE
    if not path.is_dir():
        raise FileNotFoundError(f"no predictors directory at {path}")
    if not config_path.is_file():
        raise PredictorFileError(f"{path} holds no {CONFIG_FILE}: not a predictors directory")
    try:
        config = json.loads(config_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise PredictorFileError(f"{config_path} is corrupted (not valid JSON): {err}") from err
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise PredictorFileError(f"{config_path} is not a sparselab predictors config")
    if config.get("version", 0) > FORMAT_VERSION:
        raise PredictorFileError(
            f"{path} was written by a newer sparselab (format {config['version']}); upgrade"
        )
    if not weights_path.is_file():
        raise PredictorFileError(f"{path} is missing its weights file {WEIGHTS_FILE}")
    expected = (config.get("sha256") or {}).get(WEIGHTS_FILE)
    if expected is not None and sha256_of(weights_path) != expected:
        raise PredictorFileError(
            f"{weights_path} is corrupted or was modified: its checksum does not match "
            f"the one recorded in {CONFIG_FILE}"
        )
    lookahead = config.get("lookahead", False)
    if not isinstance(lookahead, bool):
        raise PredictorFileError(f"{config_path}: lookahead must be true or false, got {lookahead!r}")
    try:
        tensors = load_file(str(weights_path))
        bad = sorted(name for name, t in tensors.items()
                     if t.is_floating_point() and not bool(torch.isfinite(t).all()))
        if bad:
            raise PredictorFileError(
                f"{weights_path} holds NaN or infinite values in {', '.join(bad[:4])}"
                f"{' ...' if len(bad) > 4 else ''}: a layer would silently select no neurons")
        layers = [int(x) for x in config["layers"]]
        weights = {
            layer: tuple(
                tensors[f"layer.{layer}.{name}"]
                for name in ("first.weight", "second.weight", "second.bias")
            )
            for layer in layers
        }
        calibration = {
            layer: (tensors[f"layer.{layer}.quantiles.all"], tensors[f"layer.{layer}.quantiles.positive"])
            for layer in layers
            if f"layer.{layer}.quantiles.all" in tensors
        }
        out = Predictors(
            weights,
            rule_from_dict(config["rule"]),
            policy=Policy(config["policy"]["kind"], config["policy"]["value"]),
            lookahead=lookahead,
            calibration=calibration,
            model=config.get("model"),
            activation=config.get("activation"),
            config=config.get("training"),
            layer_info={int(k): v for k, v in (config.get("layer_info") or {}).items()},
            versions=config.get("versions"),
        )
    except (SafetensorError, KeyError, TypeError, ValueError) as err:
        raise PredictorFileError(f"{path} is corrupted or incomplete: {err}") from err
    if model is not None:
        out.check_model(model)
    return out
