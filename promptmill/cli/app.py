"""What every command shares: the Typer app, the consoles, one-line errors, and the job store."""

from __future__ import annotations

import importlib.metadata
from contextlib import contextmanager
from typing import Annotated, Iterator, NamedTuple, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from promptmill.config.settings import MAX_CHUNK_SIZE, Settings, get_settings
from promptmill.api.driving import checked_budget, expire_if_finished, open_store  # noqa: F401  (the commands' too)
from promptmill.jobs.readers import INPUT_FORMATS
from promptmill.config.backends import BACKENDS, DEFAULT_BACKEND
from promptmill.jobs.spec import JobSpec
from promptmill.jobs.state.store import JobStore

def _type_shown(param: typer.core.TyperOption | typer.core.TyperArgument, ctx: object) -> str | None:
    """A parameter's type as help shows it: nothing for a flag or an argument (its name says it),
    its metavar where it has one, else click's plain words (INTEGER, TEXT), never `<bool>`."""
    if isinstance(param, typer.core.TyperArgument) or getattr(param, "is_flag", False):
        return None
    if param.metavar is not None:
        return param.metavar
    label = typer.core.TyperOption.display_type(param, ctx).strip("<>").removesuffix(" range")  # type: ignore[arg-type]
    return {"int": "INTEGER", "str": "TEXT", "float": "NUMBER"}.get(label, label.upper())


typer.core.TyperOption.display_type_rich = _type_shown  # type: ignore[method-assign]
typer.core.TyperArgument.display_type_rich = _type_shown  # type: ignore[method-assign]

app = typer.Typer(
    no_args_is_help=True,
    # Locals in a traceback would print the Redis password and the API key held in our variables.
    pretty_exceptions_show_locals=False,
    add_completion=False,
    help="Run one LLM call per row of a dataset, through Redis and Celery workers, resumably, with cost per job.",
)
out = Console()
err = Console(stderr=True)


def _print_version(asked: bool) -> None:
    if asked:
        out.print(f"promptmill {importlib.metadata.version('promptmill')}", highlight=False)
        raise typer.Exit()


@app.callback()
def _options(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """Run one LLM call per row of a dataset, through Redis and Celery workers, resumably, with cost per job."""


def fail(message: str, code: int = 2) -> NoReturn:
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)  # a message is no markup
    raise typer.Exit(code)


def spec_or_fail(store: JobStore, job_id: str) -> JobSpec:
    try:
        return store.spec(job_id)
    except KeyError as missing:
        fail(f"{missing.args[0]}")


class OpenJob(NamedTuple):
    settings: Settings
    store: JobStore
    url: str
    spec: JobSpec


@contextmanager
def open_job(job_id: str) -> Iterator[OpenJob]:
    """A command's job: its settings, the store it is in, and its spec; one line and exit 2 if unknown."""
    settings = get_settings()
    with open_store(settings) as (store, url):
        yield OpenJob(settings, store, url, spec_or_fail(store, job_id))


JobArg = Annotated[str, typer.Argument(metavar="JOB", help="A job id (`promptmill jobs` lists them).")]
JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON for machines.")]
BackendOption = typer.Option(
    DEFAULT_BACKEND,
    "--backend",
    "-b",
    help="; ".join(f"{name}: {info.summary}" for name, info in BACKENDS.items()) + ".",
)
RpmOption = typer.Option(None, "--rpm", min=1, help="The account's requests per minute (default: from its headers).")
InputTpmOption = typer.Option(
    None, "--input-tpm", min=1, help="The account's input tokens per minute (openai: its one token budget)."
)
OutputTpmOption = typer.Option(None, "--output-tpm", min=1, help="The account's output tokens per minute.")
InputFormatOption = typer.Option(
    None, "--input-format", help=f"The input's format: {', '.join(INPUT_FORMATS)} (default: from its name; a JSONL file of batch requests is openai-batch)."
)
# The old spelling of --input-format on the commands that read an input; it still works, with a note.
OldFormatOption = typer.Option(None, "--format", hidden=True, help="Old spelling of --input-format.")


def input_format_of(input_format: str | None, old_format: str | None) -> str | None:
    if old_format is not None:
        err.print("note: `--format` for the input is now `--input-format` (`--format` is export's output format)")
    return input_format or old_format
ChunkSizeOption = typer.Option(None, min=1, max=MAX_CHUNK_SIZE, help="Rows per chunk (task).")
def budget_checked(usd: float | None) -> float | None:
    try:
        return checked_budget(usd)
    except ValueError as bad:
        raise typer.BadParameter(str(bad).removeprefix("budget: ")) from None


BudgetOption = typer.Option(
    None, "--budget", min=0.0, callback=budget_checked,
    help="USD the job may spend at most: it pauses (paused_budget) before passing it.",
)  # fmt: skip
