"""`promptmill init`: a starter pipeline, commented, for each kind of output."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import typer

from promptmill.cli.app import app, err, fail

_HEAD = """\
# A promptmill pipeline: what to ask of each row, and how to read the answer.
# Run it:   promptmill run INPUT --pipeline {path}            (the Anthropic API; ANTHROPIC_API_KEY)
#           promptmill run INPUT --pipeline {path} --backend vllm --model gemma3-270m   (local, no key)
name = "{name}"
model = "claude-haiku-4-5"
# The system prompt, the same for every row (optional).
system = "{system}"
# The user turn: {{column}} is filled from each row's column of that name. A literal brace is doubled: {{{{ }}}}.
prompt = "{prompt}"
# The most tokens an answer may take: a cap on cost, and on the time of a runaway answer.
max_tokens = {max_tokens}
# temperature = 0.0          # sampling (optional)
# id_column = "id"           # carry the input's id into every record, to join the results back
# [limits]
# rpm = 50                   # the account's requests per minute (else learned from the API's headers)
"""

_OUTPUTS = {
    "text": dict(
        system="You summarise customer messages in one sentence.",
        prompt="Summarise this message:\\n\\n{text}",
        max_tokens=100,
        output='\n[output]\ntype = "text"   # the answer as it is\n',
    ),
    "choice": dict(
        system="You label the sentiment of product reviews.",
        prompt="Review: {text}\\nAnswer with one word: positive, negative or neutral.",
        max_tokens=5,
        output='\n[output]\n# The answer must be one of these labels (case and surrounding punctuation aside);\n'
        '# anything else fails the row as unparseable_output.\ntype = "choice"\nchoices = ["positive", "negative", "neutral"]\n',
    ),
    "json": dict(
        system="You extract fields from invoices. Answer with JSON only.",
        prompt="Extract the merchant, the date (YYYY-MM-DD) and the total from this invoice:\\n\\n{text}",
        max_tokens=200,
        output='\n[output]\n# The answer must be JSON matching this schema; exports get a column per top-level field.\n'
        'type = "json"\n'
        'schema = { type = "object", required = ["merchant", "date", "total"], properties = { '
        'merchant = { type = "string" }, date = { type = "string" }, total = { type = "number" } } }\n',
    ),
}


@app.command()
def init(
    path: Path = typer.Argument(Path("pipeline.toml"), metavar="FILE", help="Where the pipeline goes."),
    output: Literal["text", "choice", "json"] = typer.Option("text", "--output", "-o", help="text, choice or json."),
    force: bool = typer.Option(False, "--force", help="Overwrite the file if it exists."),
) -> None:
    """Write a starter pipeline, with comments, for text, choice or JSON output."""
    if path.exists() and not force:
        fail(f"{path} exists; choose another name, or --force")
    parts = _OUTPUTS[output]
    head = _HEAD.format(path=path, name=path.stem, system=parts["system"], prompt=parts["prompt"], max_tokens=parts["max_tokens"])
    path.write_text(head + parts["output"], encoding="utf-8")
    err.print(f"wrote {path} ({output} output); its prompt reads the column {{text}}: edit it to name yours", highlight=False, markup=False)
