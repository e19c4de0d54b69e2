"""Predictor files: a directory with ``predictors.safetensors`` (weights and score sketches)
and ``predictors.json`` (everything else, with the weights' checksum). No pickle.

    >>> save_predictors(predictors, "smollm2.predictors")    # == predictors.save(...)
    >>> load_predictors("smollm2.predictors", model=model)   # == sl.Predictors.load(...)

Replacing a directory is safe against a kill at any moment: the new directory is written
beside it (``.NAME.sparselab-tmp.<pid>.<random>``), the old one is renamed aside
(``.NAME.sparselab-old.<pid>.<random>``), the new one renamed into place, and the old one
removed. A kill between the two renames leaves no directory at the path but both complete
directories beside it: the next load or save of the path puts the new one in place
(:func:`recover`; the old one if the new one is not complete) and removes the leftovers of
writers that are gone (:mod:`sparselab._temporaries`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

from sparselab._temporaries import remove, remove_stale, stale_temporaries, temp_dir
from sparselab.masking.rules import rule_from_dict
from sparselab.prediction.lowrank import Predictors
from sparselab.prediction.policy import Policy

__all__ = ["CONFIG_FILE", "FORMAT", "FORMAT_VERSION", "WEIGHTS_FILE", "PredictorFileError",
           "load_predictors", "recover", "save_predictors", "sha256_of"]

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


def _complete(directory: Path) -> bool:
    """Whether ``directory`` holds a whole predictors save (config written last, with the
    weights' checksum, and the weights match it)."""
    try:
        config = json.loads((directory / CONFIG_FILE).read_text())
        expected = config["sha256"][WEIGHTS_FILE]
        return config.get("format") == FORMAT and sha256_of(directory / WEIGHTS_FILE) == expected
    except (OSError, ValueError, KeyError, TypeError):
        return False


def recover(path: str | os.PathLike) -> Path | None:
    """Finish a replacement of predictors directory ``path`` that a kill interrupted.

        >>> recover("smollm2.predictors")   # done by load_predictors and save_predictors

    When ``path`` is missing and a writer that is gone left its new directory complete
    beside it, that one is renamed into place (else the old one it had moved aside); then
    the stale temporaries of ``path`` are removed. Returns what was put in place, or None.
    Temporaries of a live writer are left alone.
    """
    path = Path(path)
    restored = None
    if not path.exists() and not path.is_symlink():
        stale = stale_temporaries(path)
        new = [t.path for t in stale if t.kind == "tmp" and _complete(t.path)]
        old = [t.path for t in stale if t.kind == "old" and t.path.is_dir()]
        for candidate in (new[-1:] or old[-1:]):  # the newest of its kind
            try:
                os.replace(candidate, path)
                restored = candidate
            except OSError:  # another process recovered it first
                pass
    remove_stale(path)
    return restored


def save_predictors(predictors: Predictors, path: str | os.PathLike) -> Path:
    """Write ``predictors.safetensors`` + ``predictors.json`` into directory ``path``.

        >>> save_predictors(predictors, "smollm2.predictors")

    Atomic, also against a kill (module docstring): at any moment the path holds the old
    or the new complete directory, or, after a kill between two renames, :func:`recover`
    finds the new one. An existing directory is replaced only if it holds sparselab
    predictors and nothing else.
    """
    from safetensors.torch import save_file

    path = Path(path)
    recover(path)
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
    tmp = temp_dir(path, "tmp")
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
            old = temp_dir(path, "old")  # an empty directory: rename() replaces it
            os.replace(path, old)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            if not path.exists():
                os.replace(old, path)
            else:
                remove(old)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return path


def load_predictors(path: str | os.PathLike, model=None, check_weights: bool = True) -> Predictors:
    """Read a directory written by :func:`save_predictors`; with ``model``, check it matches.

        >>> predictors = load_predictors("smollm2.predictors", model=model)

    The check compares sizes and, unless ``check_weights=False``, the fingerprint of the
    MLP weights saved with the predictors (files without one, from older versions, are
    checked by sizes only): :meth:`Predictors.check_model`.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    recover(path)
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
    identity = config.get("model")
    if identity is not None and not isinstance(identity, dict):
        raise PredictorFileError(f"{config_path}: model must be an object, got {type(identity).__name__}")
    if (identity or {}).get("mlp_fingerprint") is not None:
        from sparselab.models.fingerprint import check_fingerprint

        try:
            check_fingerprint(identity["mlp_fingerprint"])
        except ValueError as err:
            raise PredictorFileError(f"{config_path}: model.mlp_fingerprint is malformed: {err}") from err
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
        out.check_model(model, check_weights=check_weights)
    return out
