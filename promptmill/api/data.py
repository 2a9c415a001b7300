"""What `pm.run` is given to read, as a file the producer streams: a path as it is; a DataFrame, an
Arrow table or a Hugging Face dataset as Parquet; any iterable of dicts as JSONL, a row at a time.

A staged file is named by its content's sha256 under the data folder: the same data stages to the
same file, which a resumed job reads again. A prompt function is run here, as the rows are staged,
and its text is one more column of the staged rows, so workers anywhere need none of the caller's code.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import orjson

from promptmill.api.pipeline import PROMPT_COLUMN, Pipeline
from promptmill.jobs.readers import detect_format, iter_rows
from promptmill.jobs.spec import InputFormat
from promptmill.pipelines.render import MESSAGES_COLUMN, PROMPT_ERROR_COLUMN, RenderError, conversation

#: Columns the staging adds, which results leave out of the input's own.
STAGED_COLUMNS = (PROMPT_COLUMN, MESSAGES_COLUMN, PROMPT_ERROR_COLUMN)
_BATCH_ROWS = 1024


@dataclass(frozen=True)
class StagedInput:
    path: Path
    input_format: InputFormat
    sha256: str
    #: The folder the rows' relative file paths are in, where it is not the staged file's own: the
    #: caller's working folder for data in memory, the data file's for a file staged anew.
    attachment_root: Path | None = None
    #: Its prompt columns were written here (the caller's prompt function): they are promptmill's own.
    prompts: bool = False

    def identity(self, with_root: bool) -> str:
        """The data's part of a job's fingerprint: its sha256 (short), and where its rows' relative
        file paths lead (the same paths from another folder are other files)."""
        if not with_root or self.attachment_root is None:
            return self.sha256[:16]
        return self.sha256[:16] + hashlib.sha256(str(self.attachment_root).encode()).hexdigest()[:8]


class MissingExtra(ImportError):
    """An optional library the call needs is not installed; the message names the extra."""


def need(module: str, extra: str) -> Any:
    """Import an optional library, or say which extra installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtra(f"{module} is not installed: pip install 'promptmill[{extra}]'") from None


def stage(data: Any, pipeline: Pipeline, folder: Path, input_format: InputFormat | None = None) -> StagedInput:
    """The data as a file a job reads (see the module's note)."""
    render = pipeline.prompt_function
    # A relative attachment path is the data's: its file's folder, or for data in memory the caller's
    # working folder. It is kept as it is, and the job records the folder (and confines files to it).
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        if not path.exists():
            raise FileNotFoundError(f"data: {path} does not exist")
        fmt = input_format or detect_format(path)
        if render is None:
            return StagedInput(path, fmt, file_sha256(path))
        rows = (row if isinstance(row, dict) else {PROMPT_ERROR_COLUMN: row.reason} for _, _, row in iter_rows(path, fmt))
        return _staged(_stage_jsonl(rows, render, folder), path.resolve().parent, render)
    root = Path.cwd().resolve()
    batches = _arrow_batches(data)
    if batches is not None:
        return _staged(_stage_parquet(batches, render, folder), root, render)
    if isinstance(data, Mapping) or not isinstance(data, Iterable):
        raise TypeError(
            f"data: expected a file's path, a pandas or polars DataFrame, a pyarrow Table, a datasets.Dataset "
            f"or an iterable of dicts, not {type(data).__name__}"
        )
    return _staged(_stage_jsonl(iter(data), render, folder), root, render)


def as_staged(spec: Any, staged: StagedInput) -> Any:
    """The job spec as staging made its input: the folder its rows' relative file paths are in, and
    whether its prompt columns are promptmill's (`JobSpec.own_columns`)."""
    root = str(staged.attachment_root) if staged.attachment_root is not None else None
    return spec.model_copy(update={"attachment_root": root, "staged": staged.prompts})


def _staged(staged: StagedInput, root: Path, render: Callable[..., Any] | None) -> StagedInput:
    return StagedInput(staged.path, staged.input_format, staged.sha256, root, prompts=render is not None)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _arrow_batches(data: Any) -> Iterator[Any] | None:
    """The data's Arrow record batches, if it is a table of a library we know (by its type's module,
    so that none of them is imported for data that is not theirs)."""
    module = type(data).__module__.split(".")[0]
    if module == "pyarrow":
        import pyarrow as pa

        if isinstance(data, pa.Table):
            return iter(data.to_batches(max_chunksize=_BATCH_ROWS))
        if isinstance(data, pa.RecordBatchReader):
            return iter(data)
        return None
    if module == "pandas" and hasattr(data, "columns"):
        import pyarrow as pa

        return iter(pa.Table.from_pandas(data, preserve_index=False).to_batches(max_chunksize=_BATCH_ROWS))
    if module == "polars" and hasattr(data, "to_arrow"):
        return iter(data.to_arrow().to_batches(max_chunksize=_BATCH_ROWS))
    if module == "datasets" and hasattr(data, "with_format"):
        return (batch for table in data.with_format("arrow").iter(batch_size=_BATCH_ROWS) for batch in table.to_batches())
    return None


def _prompts(rows: list[Any], render: Callable[[Mapping[str, Any]], Any]) -> dict[str, list[str | None]]:
    """Each row's prompt from the caller's function (its text, or a conversation as JSON), or why it
    has none: the staged columns' values."""
    prompts: list[str | None] = []
    conversations: list[str | None] = []
    errors: list[str | None] = []
    for row in rows:
        prompt, messages, error = None, None, None
        if not isinstance(row, Mapping):
            error = f"the row is a {type(row).__name__}, not a mapping of columns"
        elif row.get(PROMPT_ERROR_COLUMN):
            error = str(row[PROMPT_ERROR_COLUMN])  # a row the reader could not read
        else:
            try:
                prompt = render(row)
            except Exception as bad:  # noqa: BLE001 - the caller's code: its failure is the row's, with its reason
                error = f"the prompt function raised {type(bad).__name__}: {bad}"
            else:
                if isinstance(prompt, list):
                    try:
                        messages, prompt = orjson.dumps(conversation(prompt)).decode(), ""
                    except RenderError as bad:
                        error, prompt = str(bad), None
                elif not isinstance(prompt, str):
                    error, prompt = (
                        f"the prompt function returned a {type(prompt).__name__}, not the prompt's text or a list of messages",
                        None,
                    )
        prompts.append(prompt)
        conversations.append(messages)
        errors.append(error)
    return {PROMPT_COLUMN: prompts, MESSAGES_COLUMN: conversations, PROMPT_ERROR_COLUMN: errors}


def _stage_parquet(batches: Iterator[Any], render: Callable[..., Any] | None, folder: Path) -> StagedInput:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / f".staging-{os.getpid()}-{id(batches)}.parquet"
    writer = None
    try:
        for batch in batches:
            table = pa.Table.from_batches([batch])
            if render is not None:
                for name, values in _prompts(batch.to_pylist(), render).items():
                    table = table.append_column(name, pa.array(values, pa.string()))
            if writer is None:
                writer = pq.ParquetWriter(partial, table.schema)
            writer.write_table(table)
        if writer is None:
            raise ValueError("data: it has no rows")
    finally:
        if writer is not None:
            writer.close()
    return _named_by_content(partial, "parquet")


def _stage_jsonl(rows: Iterator[Any], render: Callable[..., Any] | None, folder: Path) -> StagedInput:
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / f".staging-{os.getpid()}-{id(rows)}.jsonl"
    options = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS | orjson.OPT_APPEND_NEWLINE
    written = 0
    with partial.open("wb") as handle:
        while batch := _take(rows, _BATCH_ROWS):
            if render is not None:
                staged = _prompts(batch, render)
                batch = [
                    {**(row if isinstance(row, Mapping) else {}), **{name: values[i] for name, values in staged.items()}}
                    for i, row in enumerate(batch)
                ]
            for row in batch:
                handle.write(orjson.dumps(row, default=str, option=options))
            written += len(batch)
    if not written:
        partial.unlink()
        raise ValueError("data: it has no rows")
    return _named_by_content(partial, "jsonl")


def _take(rows: Iterator[Any], count: int) -> list[Any]:
    batch = []
    for row in rows:
        batch.append(row)
        if len(batch) == count:
            break
    return batch


def _named_by_content(partial: Path, fmt: InputFormat) -> StagedInput:
    sha = file_sha256(partial)
    final = partial.with_name(f"{sha}.{fmt}")
    os.replace(partial, final)  # the same content twice: the same file, replaced by itself
    return StagedInput(final, fmt, sha)


__all__ = ["STAGED_COLUMNS", "MissingExtra", "StagedInput", "file_sha256", "need", "stage", "as_staged"]
