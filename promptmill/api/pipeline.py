"""`pm.Pipeline`: what a pipeline file holds, built in Python, with a prompt that may be a function
and an output that may be a Pydantic model."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Union

import tomli_w
from pydantic import BaseModel, ValidationError

from promptmill.pipelines.spec import Pipeline as PipelineFile
from promptmill.pipelines.spec import PipelineError, load_pipeline, validation_problems

_NO_MODEL = "(no model yet)"
#: The column a prompt function's text goes into, in the rows the caller's process writes for the job.
PROMPT_COLUMN = "_promptmill_prompt"

Output = Union[str, list[str], type[BaseModel], dict[str, Any]]
Prompt = Union[str, Callable[[Mapping[str, Any]], Union[str, list[dict[str, str]]]]]


class Pipeline:
    """What to ask of each row and how to read the answer: the fields of a pipeline file.

    `prompt` is a template naming columns (``"Classify: {text}"``) or a function of the row
    returning the prompt's text or a conversation (``[{"role": "user", "content": ...}, ...]``); a
    function runs in this process as the rows are read, so workers on other machines never need
    this code, and a row it fails on fails alone, with the function's error as its reason. `output` is ``"text"``, a list of labels, a Pydantic
    model class, or a JSON schema (a dict). Every other keyword is the pipeline file's key of that
    name (`system`, `max_tokens`, `temperature`, `top_p`, `stop`, `seed`, `fallback`, `stream`,
    `limits`, `price`, `cache_system`, `cache_prefix`, `engine`, `id_column`, ...).

    >>> import promptmill as pm
    >>> sentiment = pm.Pipeline(
    ...     prompt="Is this review positive or negative? {text}",
    ...     output=["positive", "negative"],
    ...     model="claude-haiku-4-5",
    ...     max_tokens=5,
    ... )
    >>> sentiment.file.output.choices
    ['positive', 'negative']

    A bad field raises `pm.PipelineError` naming it.
    """

    def __init__(
        self,
        prompt: Prompt,
        *,
        model: str | None = None,
        output: Output = "text",
        max_tokens: int = 256,
        name: str = "pipeline",
        system: str | None = None,
        **fields: Any,
    ) -> None:
        self.prompt_function = prompt if callable(prompt) else None
        self.output_model = output if isinstance(output, type) and issubclass(output, BaseModel) else None
        # A model may also be named at run (`pm.run(..., model=)`); until then the file form holds a mark.
        self.model_missing = model is None
        raw = {
            "name": name,
            "model": model or _NO_MODEL,
            "prompt": "{" + PROMPT_COLUMN + "}" if self.prompt_function else prompt,
            "max_tokens": max_tokens,
            "output": _output_table(output),
            **({"system": system} if system is not None else {}),
            **fields,
        }
        try:
            self.file = PipelineFile.model_validate(raw)
        except ValidationError as bad:
            raise PipelineError(validation_problems(bad)) from None

    @classmethod
    def from_toml(cls, path: str | Path) -> "Pipeline":
        """The pipeline of a TOML file (`promptmill init` writes one)."""
        return cls._of(load_pipeline(path))

    @classmethod
    def _of(cls, file: PipelineFile) -> "Pipeline":
        pipeline = cls.__new__(cls)
        pipeline.prompt_function, pipeline.output_model, pipeline.file = None, None, file
        pipeline.model_missing = False
        return pipeline

    def to_toml(self, path: str | Path | None = None) -> str:
        """The pipeline as a file's TOML (written to `path` when given). A prompt function has no
        file form: it raises `PipelineError`."""
        if self.prompt_function is not None:
            raise PipelineError("prompt: a Python function has no TOML form; write the prompt as a template")
        if self.model_missing:
            raise PipelineError("model: a pipeline file names its model; give Pipeline(model=...)")
        dumped = self.file.model_dump(mode="json", by_alias=True, exclude_none=True, exclude_defaults=True)
        # exclude_defaults drops what the file form requires when it equals a default; keep it.
        text = tomli_w.dumps({"name": self.file.name, "model": self.file.model, "prompt": self.file.prompt,
                              "max_tokens": self.file.max_tokens, **dumped})  # fmt: skip
        if path is not None:
            Path(path).write_text(text, encoding="utf-8")
        return text

    def with_model(self, model: str | None) -> "Pipeline":
        """This pipeline asking `model` (None: as it is); one with no model must be given one."""
        if model is None and self.model_missing:
            raise PipelineError("model: no model; give pm.Pipeline(model=...) or pm.run(..., model=...)")
        if model is None or model == self.file.model:
            return self
        changed = Pipeline._of(self.file.model_copy(update={"model": model}))
        changed.prompt_function, changed.output_model = self.prompt_function, self.output_model
        return changed

    @property
    def model(self) -> str:
        return self.file.model

    def __repr__(self) -> str:
        prompt = getattr(self.prompt_function, "__name__", "a function") if self.prompt_function else self.file.prompt
        return f"Pipeline(prompt={prompt!r}, model={self.file.model!r}, output={self.file.output.type!r})"


def _output_table(output: Output) -> dict[str, Any]:
    if isinstance(output, type) and issubclass(output, BaseModel):
        return {"type": "json", "schema": output.model_json_schema()}
    if isinstance(output, dict):
        return {"type": "json", "schema": output}
    if isinstance(output, (list, tuple)):
        return {"type": "choice", "choices": list(output)}
    if output in ("text", "json", "choice"):
        return {"type": output}
    raise PipelineError(
        f"output: {output!r} is not an output; give 'text', a list of labels, a Pydantic model class or a JSON schema"
    )


def as_pipeline(pipeline: "Pipeline | str | Path") -> Pipeline:
    """A `Pipeline`, or the pipeline of a TOML file's path."""
    if isinstance(pipeline, Pipeline):
        return pipeline
    if isinstance(pipeline, (str, Path)):
        return Pipeline.from_toml(pipeline)
    raise TypeError(f"pipeline: expected pm.Pipeline or a TOML file's path, not {type(pipeline).__name__}")


__all__ = ["Pipeline", "PipelineError", "PROMPT_COLUMN", "as_pipeline"]
