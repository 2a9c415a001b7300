"""The Python API (`import promptmill as pm`) with real parts: the local Anthropic-protocol server,
the shared Redis, real Celery workers started by `pm.run` (or by `promptmill worker` for `submit`)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import re
import textwrap
from pathlib import Path

import pyarrow as pa
import pytest
from pydantic import BaseModel

import promptmill as pm
from promptmill.config.settings import get_settings
from promptmill.jobs.state.store import JobStore
from tests.support import ROOT, interruptible, promptmill, start_cli, stop, wait_until
from tests.test_api_jobs import successes_by_prompt

HAIKU = "claude-haiku-4-5"
RESULT_COLUMNS = ["output", "status", "error", "model", "attempts", "usage", "cost_usd"]


@pytest.fixture
def api_env(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """This process's environment as a user's with the shared Redis and the local server: `pm` reads
    its settings from it, as a notebook's kernel would."""
    for name in list(os.environ):
        if name.startswith(("PROMPTMILL_", "ANTHROPIC_")):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    yield env
    get_settings.cache_clear()


def reviews(count: int, start: int = 0) -> list[dict]:
    labels = ("positive", "negative")
    return [{"id": f"r{i}", "text": f"review {i} [[reply:{labels[i % 2]}]]", "stars": i % 5} for i in range(start, start + count)]


SENTIMENT = dict(prompt="Sentiment of: {text}", output=["positive", "negative"], model=HAIKU, max_tokens=4)


def test_each_kind_of_data_goes_in_and_comes_out_as_a_table_beside_its_input_columns(tmp_path, api_env, fake_api):
    import datasets
    import pandas as pd
    import polars as pl

    rows = reviews(12)
    (tmp_path / "rows.csv").write_text("id,text,stars\n" + "".join(f"{r['id']},{r['text']},{r['stars']}\n" for r in rows))
    kinds = {
        "pandas": pd.DataFrame(rows),
        "polars": pl.DataFrame(rows),
        "arrow": pa.Table.from_pylist(rows),
        "datasets": datasets.Dataset.from_list(rows),  # built here, never downloaded
        "iterable": (dict(row) for row in rows),  # a generator: streamed, read once
        "path": tmp_path / "rows.csv",
    }
    pipeline = pm.Pipeline(**SENTIMENT)
    for kind, data in kinds.items():
        results = pm.run(data, pipeline, out=tmp_path / kind, workers=1, progress=False, name=f"kinds-{kind}")
        assert results.status == "complete"
        frame = results.to_pandas()
        assert list(frame.columns) == ["id", "text", "stars", *RESULT_COLUMNS], kind
        assert list(frame["id"]) == [r["id"] for r in rows], kind  # input order, one row per input row
        assert list(frame["output"]) == ["positive", "negative"] * 6 and set(frame["status"]) == {"ok"}, kind
        assert frame["stars"].tolist() == [r["stars"] for r in rows], kind  # the input's own types (CSV's ints too)
        assert frame["cost_usd"].sum() == pytest.approx(results.cost()["cost_usd"]) and results.cost()["cost_usd"] > 0
        assert frame["usage"][0]["output_tokens"] == 1
    assert pm.run(kinds["pandas"], pipeline, progress=False, name="kinds-pandas").to_polars().shape == (12, 10)
    assert len(results.to_hf()) == 12 and results.to_arrow().column_names[:3] == ["id", "text", "stars"]


def test_a_second_run_sends_nothing_and_other_work_under_the_same_name_is_refused(tmp_path, api_env, fake_api, redis_url):
    rows = reviews(30)
    pipeline = pm.Pipeline(**SENTIMENT)
    first = pm.run(rows, pipeline, out=tmp_path / "out", workers=1, progress=False)
    sent = len(fake_api.log())
    assert sent == 30 and first.status == "complete"
    again = pm.run(reviews(30), pipeline, progress=False)  # the same data and pipeline: found by its fingerprint
    assert again.job_id == first.job_id and len(fake_api.log()) == sent
    assert [r["output"] for r in again] == [r["output"] for r in first]
    JobStore.from_url(redis_url).delete_job(first.job_id)  # its keys expired (JOB_TTL_DAYS): its results stay
    kept = pm.run(reviews(30), pipeline, progress=False)
    assert (kept.job_id, kept.status, len(fake_api.log())) == (first.job_id, "complete", sent)
    assert kept.cost() == first.cost() and kept.to_arrow().equals(first.to_arrow())

    named = pm.run(rows, pipeline, name="nightly", workers=1, progress=False)
    with pytest.raises(pm.JobError, match=r"name 'nightly' is job .*\(data differ\)"):
        pm.run(reviews(30, start=1), pipeline, name="nightly", progress=False)
    with pytest.raises(pm.JobError, match=r"pipeline differ"):
        pm.run(rows, pm.Pipeline(**{**SENTIMENT, "max_tokens": 5}), name="nightly", progress=False)
    assert pm.run(rows, pipeline, name="nightly", progress=False).job_id == named.job_id


class Review(BaseModel):
    product: str
    stars: int


def test_a_pydantic_output_and_a_prompt_function_run_in_the_caller_one_bad_row_failing_alone(tmp_path, api_env, fake_api, monkeypatch):
    def prompt(row: dict) -> str:
        if row["id"] == "r3":
            raise KeyError("no such field")
        return f'Extract from {row["id"]} [[reply:{{"product": "kettle {row["id"]}", "stars": {row["stars"]}}}]]'

    pipeline = pm.Pipeline(prompt=prompt, output=Review, model=HAIKU, max_tokens=40)
    results = pm.run(reviews(6), pipeline, out=tmp_path / "out", workers=1, progress=False)
    outputs = list(results.outputs())
    assert outputs[0] == Review(product="kettle r0", stars=0) and outputs[3] is None
    assert all(isinstance(o, Review) for i, o in enumerate(outputs) if i != 3)
    (failed,) = results.failed()
    assert failed["row"] == 3 and failed["error"]["kind"] == "render_error"
    assert "the prompt function raised KeyError" in failed["error"]["message"]
    frame = results.to_pandas()
    assert list(frame.columns) == ["id", "text", "stars", *RESULT_COLUMNS, "output.product", "output.stars"]
    assert frame["output.stars"].tolist()[:3] == [0, 1, 2] and frame["output.product"][5] == "kettle r5"
    assert len(fake_api.log()) == 5  # the row whose prompt could not be made was never sent
    with pytest.raises(pm.PipelineError, match="prompt: a Python function has no TOML form"):
        pipeline.to_toml()
    monkeypatch.setitem(sys.modules, "polars", None)  # as if polars were not installed
    with pytest.raises(pm.MissingExtra, match=r"pip install 'promptmill\[polars\]'"):
        results.to_polars()


def test_a_pipeline_round_trips_through_toml_and_a_bad_field_is_named(tmp_path):
    pipeline = pm.Pipeline.from_toml(ROOT / "examples" / "extract.toml")
    pipeline.to_toml(tmp_path / "again.toml")
    assert pm.Pipeline.from_toml(tmp_path / "again.toml").file == pipeline.file
    with pytest.raises(pm.PipelineError, match=r"max_tokns: unknown key; did you mean 'max_tokens'"):
        pm.Pipeline(prompt="{text}", model=HAIKU, max_tokns=3)
    with pytest.raises(pm.PipelineError, match=r"output: 42 is not an output"):
        pm.Pipeline(prompt="{text}", model=HAIKU, output=42)
    with pytest.raises(pm.PipelineError, match="model: no model"):
        pm.run([{"text": "x"}], pm.Pipeline(prompt="{text}"), progress=False)


async def test_run_inside_a_running_event_loop_and_run_async_awaited(tmp_path, api_env, fake_api):
    asyncio.get_running_loop()  # a notebook cell's loop
    pipeline = pm.Pipeline(**SENTIMENT)
    inside = pm.run(reviews(8), pipeline, out=tmp_path / "a", workers=1, progress=False)
    awaited = await pm.run_async(reviews(8, start=8), pipeline, out=tmp_path / "b", workers=1, progress=False)
    assert [r["status"] for r in inside] == ["ok"] * 8 and [r["row"] for r in awaited] == list(range(8))


def test_submit_goes_to_a_separate_worker_and_a_job_reattached_by_id_waits_for_it(tmp_path, api_env, fake_api):
    worker = start_cli(api_env, "worker", "--queues", "api", quiet=True)
    try:
        job = pm.submit(reviews(40), pm.Pipeline(**SENTIMENT), out=tmp_path / "out")
        results = pm.Job(job.job_id).wait(timeout=120)
    finally:
        stop(worker)
    assert results.status == "complete" and len(results) == 40
    assert pm.Job(job.job_id).status()["ok"] == 40
    assert pm.Job(job.job_id).cost()["cost_usd"] == pytest.approx(results.cost()["cost_usd"])
    with pytest.raises(pm.JobError, match="no job nope"):
        pm.Job("nope")


SCRIPT = """
import sys
import promptmill as pm

rows = ({{"text": f"row {{i}} [[reply:positive]]"}} for i in range({rows}))
pipeline = pm.Pipeline(prompt="{{text}}", output=["positive", "negative"], model="{model}", max_tokens=4)
results = pm.run(rows, pipeline, out=sys.argv[1], workers=2, progress=False, name="killed-script")
print(results.job_id, results.status, len(results))
"""


def test_a_killed_script_run_again_resumes_exactly_with_nothing_lost(tmp_path, api_env, fake_api, redis_url):
    rows = 600
    fake_api.configure(latency_ms=30)
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(SCRIPT.format(rows=rows, model=HAIKU)))
    command = [sys.executable, str(script), str(tmp_path / "out")]
    store = JobStore.from_url(redis_url)
    before = set(store.job_ids())
    first = subprocess.Popen(command, env=api_env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_until(lambda: set(store.job_ids()) - before, 120, "the job")
    (job_id,) = set(store.job_ids()) - before
    wait_until(lambda: store.status(job_id).terminal >= 100, 120, "100 rows")
    first.send_signal(signal.SIGKILL)  # no handler runs: its workers go when they see their parent gone
    first.wait(timeout=30)
    done_at_kill = store.status(job_id).terminal
    assert done_at_kill < rows
    sent_before = len(fake_api.log())

    again = subprocess.run(command, env=api_env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert again.stdout.split() == [job_id, "complete", str(rows)]
    records = [line for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert len(records) == rows
    answered = successes_by_prompt(fake_api.log())
    assert set(answered) == {f"row {i} [[reply:positive]]" for i in range(rows)}  # nothing lost
    # Only what was left went out again: at most the answers on the wire when the script died (two
    # workers, each up to PROMPTMILL_MAX_IN_FLIGHT requests) were paid twice.
    in_flight = 2 * get_settings().max_in_flight
    assert sum(answered.values()) - rows <= in_flight
    assert len(fake_api.log()) - sent_before <= rows - done_at_kill + in_flight


def test_estimate_gives_what_the_cli_s_estimate_json_prints_for_the_same_rows(tmp_path, api_env, fake_api):
    import json

    import pandas as pd

    from tests.conftest import promptmill

    rows = reviews(40)
    pipeline = pm.Pipeline(**SENTIMENT)
    figures = pm.estimate(pd.DataFrame(rows), pipeline, sample=10, rpm=600)
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    pipeline.to_toml(tmp_path / "p.toml")
    printed = promptmill("estimate", str(data), "-p", str(tmp_path / "p.toml"), "--sample", "10", "--rpm", "600",
                         "--json", env=api_env)  # fmt: skip
    assert printed.returncode == 0, printed.stderr
    assert figures == json.loads(printed.stdout) and figures["rows"] == 40 and figures["input_tokens"] > 0
    with pytest.raises(pm.JobError, match="estimate counts tokens for anthropic or vllm"):
        pm.estimate(rows, pipeline, backend="openai")


def test_compare_returns_the_table_as_a_dataframe_one_row_per_contender(tmp_path, api_env, fake_api):
    import polars as pl

    rows = [{**row, "label": ("positive", "negative")[i % 2]} for i, row in enumerate(reviews(20))]
    against = [f"anthropic:{HAIKU}", f"anthropic:{HAIKU},temperature=0.5"]
    table = pm.compare(pl.DataFrame(rows), pm.Pipeline(**SENTIMENT), against, sample=12, label="label",
                       out=tmp_path / "cmp", workers=1, progress=False)  # fmt: skip
    assert list(table["name"]) == [f"anthropic:{HAIKU}", f"anthropic:{HAIKU},temperature=0.5"]
    assert list(table["ok"]) == [12, 12] and list(table["accuracy"]) == [1.0, 1.0] and list(table["agreement"]) == [1.0, 1.0]
    assert (tmp_path / "cmp" / "compare.html").exists() and len((tmp_path / "cmp" / "rows.jsonl").read_text().splitlines()) == 12
    sent = len(fake_api.log())
    again = pm.compare(pl.DataFrame(rows), pm.Pipeline(**SENTIMENT), against, sample=12, label="label",
                       out=tmp_path / "cmp", progress=False)  # fmt: skip
    assert again.equals(table) and len(fake_api.log()) == sent  # resumed: done, nothing sent again


def test_a_prompt_function_may_make_a_conversation_which_every_backend_sends_as_turns(tmp_path, api_env, fake_api):
    from promptmill.pipelines.items import RenderedRequest
    from promptmill.workers.backends.anthropic import message_params

    def chat(row: dict) -> list[dict] | str:
        if row["id"] == "r2":
            return [{"role": "system", "content": "only a system turn"}]
        return [
            {"role": "system", "content": "Answer in one word."},
            {"role": "user", "content": "Is 'great' positive?"},
            {"role": "assistant", "content": "positive"},
            {"role": "user", "content": row["text"]},
        ]

    pipeline = pm.Pipeline(prompt=chat, output=["positive", "negative"], model=HAIKU, max_tokens=4, system="You label reviews.")
    results = pm.run(reviews(4), pipeline, out=tmp_path / "out", workers=1, progress=False)
    assert [r["output"] for r in results] == ["positive", "negative", None, "negative"]
    assert "system turns only" in results.failed()[0]["error"]["message"]
    assert sorted(e["prompt"] for e in fake_api.log()) == sorted(r["text"] for r in reviews(4) if r["id"] != "r2")

    # The turns as each provider takes them: Anthropic's system beside the messages, OpenAI's and the
    # local engine's among them.
    spec = results.spec
    request = RenderedRequest(row=0, prompt="", messages=chat({"id": "r0", "text": "t"}))
    params = message_params(spec, request)
    assert params["system"] == "You label reviews.\n\nAnswer in one word."
    assert [m["role"] for m in params["messages"]] == ["user", "assistant", "user"]
    assert [m["role"] for m in request.chat("You label reviews.")] == ["system", "system", "user", "assistant", "user"]


def test_ctrl_c_stops_the_workers_at_once_and_leaves_the_job_to_resume(tmp_path, api_env, fake_api, redis_url):
    import psutil

    fake_api.configure(latency_ms=30)
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(SCRIPT.format(rows=1200, model=HAIKU)).replace("killed-script", "interrupted"))
    store = JobStore.from_url(redis_url)
    before = set(store.job_ids())
    script_run = subprocess.Popen([sys.executable, str(script), str(tmp_path / "out")], env=api_env, cwd=tmp_path,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=interruptible)  # fmt: skip
    wait_until(lambda: set(store.job_ids()) - before, 120, "the job")
    (job_id,) = set(store.job_ids()) - before
    wait_until(lambda: store.status(job_id).terminal >= 50, 120, "50 rows")
    workers = psutil.Process(script_run.pid).children(recursive=True)
    assert workers
    script_run.send_signal(signal.SIGINT)  # a kernel interrupt
    _, stderr = script_run.communicate(timeout=120)
    assert script_run.returncode != 0 and "KeyboardInterrupt" in stderr
    assert f"job {job_id} goes on with the same pm.run(...) again" in stderr
    wait_until(lambda: not any(worker.is_running() and worker.status() != psutil.STATUS_ZOMBIE for worker in workers),
               60, "the workers to stop")  # fmt: skip
    assert store.status(job_id).terminal < 1200
    resumed = pm.Job(job_id).resume(workers=2, progress=False)
    assert resumed.status == "complete" and [r["row"] for r in resumed] == list(range(1200))


def test_the_readme_s_python_example_runs_as_written_and_every_python_block_compiles(tmp_path, api_env, fake_api, monkeypatch):
    from tests.test_docs import DOCS, README, blocks

    fake_api.configure(reply="question")
    (example,) = blocks(README, "python")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(example, "README.md", "exec"), scope)  # noqa: S102 - the README's own code, as a user pastes it
    frame = scope["results"].to_pandas()
    assert list(frame["output"]) == ["question", "question"] and list(frame["id"]) == [1, 2]
    for path in (README, *DOCS):
        for body in blocks(path, "python"):
            compile(body.replace("await ", ""), path.name, "exec")
            for name in re.findall(r"\bpm\.(\w+)", body):
                assert hasattr(pm, name), f"{path.name}: pm.{name}"


def test_a_job_deleted_with_its_files_is_run_anew_by_the_same_pm_run(tmp_path, api_env, fake_api):
    """`delete --files` removes the job's folder's files (job.json, report.html and the viewer's resume
    log among them) and its names: the same `pm.run` then runs the job anew, never returning results
    that are gone."""
    pipeline = pm.Pipeline(**SENTIMENT)
    first = pm.run(reviews(12), pipeline, out=tmp_path / "out", workers=1, progress=False)
    assert first.status == "complete" and len(fake_api.log()) == 12
    pm.Job(first.job_id).report()
    (tmp_path / "out" / "logs").mkdir(exist_ok=True)
    (tmp_path / "out" / "logs" / f"{first.job_id}.ui-resume.log").write_text("a resume from the viewer\n")
    assert {"job.json", "report.html", "results.jsonl"} <= {path.name for path in (tmp_path / "out").iterdir()}
    deleted = promptmill("delete", first.job_id, "--files", env=api_env)
    assert deleted.returncode == 0, deleted.stderr
    assert not (tmp_path / "out").exists()  # every file it wrote gone, and so its emptied folder
    again = pm.run(reviews(12), pipeline, out=tmp_path / "out", workers=1, progress=False)
    assert again.job_id != first.job_id and again.status == "complete"
    assert len(fake_api.log()) == 24 and [r["output"] for r in again] == [r["output"] for r in first]


def test_what_promptmill_writes_is_its_users_alone_whatever_the_umask(tmp_path, api_env, fake_api):
    """Under a umask of 022 (files 0644, folders 0755 elsewhere), the data folder, the job folders,
    staged inputs, results, shards and logs are 0700 and 0600, from the CLI and from Python; the
    caller's own umask is as it was after a `pm.run`."""
    import stat

    before = os.umask(0o022)
    try:
        data, pipeline_path = write_rows(tmp_path / "in", 10)
        ran = promptmill("run", str(data), "-p", str(pipeline_path), "--out", str(tmp_path / "cli-out"), env=api_env)
        assert ran.returncode == 0, ran.stderr
        results = pm.run(reviews(10), pm.Pipeline(**SENTIMENT), out=tmp_path / "pm-out", workers=1, progress=False)
        assert results.status == "complete"
        assert os.umask(0o022) == 0o022  # the caller's, given back
    finally:
        os.umask(before)
    data_dir = Path(api_env["PROMPTMILL_DATA_DIR"])
    assert any((data_dir / "inputs").iterdir())  # the frame, staged
    written = 0
    for root in (tmp_path / "cli-out", tmp_path / "pm-out", data_dir):
        for path in [root, *root.rglob("*")]:
            mode = path.lstat().st_mode
            if stat.S_ISLNK(mode) or stat.S_ISSOCK(mode):
                continue
            assert mode & 0o077 == 0, f"{path} is {oct(mode & 0o777)}"
            written += 1
    assert written > 10


def write_rows(folder: Path, count: int) -> tuple[Path, Path]:
    import json

    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "rows.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in reviews(count)))
    pipeline = folder / "p.toml"
    pipeline.write_text(pm.Pipeline(**SENTIMENT).to_toml())
    return data, pipeline


def test_a_budget_must_be_a_finite_amount_on_every_face(tmp_path, api_env, fake_api):
    """inf caps nothing and nan compares to nothing: the CLI, the Python API and `budget` refuse both
    with a message saying so, and the job keeps the cap it had."""
    pipeline = pm.Pipeline(**SENTIMENT)
    data, pipeline_path = write_rows(tmp_path / "in", 3)
    for amount in ("inf", "nan", "-1"):
        refused = promptmill("run", str(data), "-p", str(pipeline_path), "--budget", amount, env=api_env)
        assert refused.returncode == 2 and "--budget" in refused.stderr, refused.stderr
        assert "Traceback" not in refused.stderr
        with pytest.raises(pm.JobError, match="budget"):
            pm.run(reviews(3), pipeline, budget=float(amount), progress=False)
    assert fake_api.log() == []
    done = pm.run(reviews(3), pipeline, budget=1.0, workers=1, progress=False)
    for amount in ("inf", "nan"):
        said = promptmill("budget", done.job_id, amount, env=api_env)
        assert said.returncode == 2 and "no amount in USD" in said.stderr, said.stderr
        with pytest.raises(pm.JobError, match="no amount in USD"):
            pm.Job(done.job_id).set_budget(float(amount))
    import json

    shown = json.loads(promptmill("status", done.job_id, "--json", env=api_env).stdout)
    assert shown["budget"]["cap_usd"] == 1.0
