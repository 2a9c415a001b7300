"""A newcomer's first hour: the usual mistakes are caught at submit, before anything is paid; a job
that fails as a whole says so loudly; results join back to the input. Real CLI, real Redis, real
Celery workers, the real anthropic SDK against the local server."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from tests.conftest import promptmill, read_jsonl
from tests.support import write_dataset
from tests.test_api_jobs import job_id_of

PIPELINE = """
name = "describe"
model = "claude-haiku-4-5"
prompt = 'Describe {description} [[reply:{answer}]]'
max_tokens = 16
"""
ROWS = [{"sku": f"A-{i}", "description": f"item {i}", "price": i * 1.5, "answer": f"answer {i}"} for i in range(6)]


def _inputs(folder: Path) -> dict[str, Path]:
    """The same rows as JSONL, a JSON array, CSV and Parquet."""
    folder.mkdir(parents=True, exist_ok=True)
    jsonl, _ = write_dataset(folder, ROWS)
    (folder / "rows.json").write_text(json.dumps(ROWS))
    csv_rows = ["sku,description,price,answer"] + [f"{r['sku']},{r['description']},{r['price']},{r['answer']}" for r in ROWS]
    (folder / "rows.csv").write_text("\n".join(csv_rows) + "\n")
    pq.write_table(pa.Table.from_pylist(ROWS), folder / "rows.parquet")
    return {"jsonl": jsonl, "json": folder / "rows.json", "csv": folder / "rows.csv", "parquet": folder / "rows.parquet"}


def test_a_prompt_naming_a_column_the_input_lacks_is_refused_at_submit_in_every_format(tmp_path, env, fake_api):
    inputs = _inputs(tmp_path / "in")
    misspelt = tmp_path / "misspelt.toml"
    misspelt.write_text(PIPELINE.replace("{description}", "{descripton}"))
    braces = tmp_path / "braces.toml"
    braces.write_text(PIPELINE.replace("Describe {description}", 'Answer as {"name": "..."} for {description}'))
    for fmt, data in inputs.items():
        refused = promptmill("run", str(data), "--pipeline", str(misspelt), "--out", str(tmp_path / fmt), env=env)
        assert refused.returncode == 2, (fmt, refused.stderr)
        assert "prompt: {descripton} is not a column of the input" in refused.stderr, refused.stderr
        assert "did you mean {description}?" in refused.stderr and "{{ and }}" in refused.stderr
        assert "Traceback" not in refused.stderr and not refused.stdout
        literal = promptmill("run", str(data), "--pipeline", str(braces), "--out", str(tmp_path / fmt), env=env)
        assert literal.returncode == 2 and 'prompt: {"name"} is not a column' in literal.stderr, literal.stderr
        assert "{{ and }}" in literal.stderr
    assert fake_api.log() == []  # nothing was sent, nothing paid
    fixed = tmp_path / "fixed.toml"
    fixed.write_text(PIPELINE.replace("Describe {description}", 'Answer as {{"name": "..."}} for {description}'))
    ran = promptmill("run", str(inputs["csv"]), "--pipeline", str(fixed), "--out", str(tmp_path / "ok"), env=env)
    assert ran.returncode == 0, ran.stderr
    assert fake_api.log()[0]["prompt"].startswith('Answer as {"name": "..."} for item 0')


def test_a_misspelt_pipeline_key_and_a_misspelt_id_column_get_did_you_mean(tmp_path, env, fake_api):
    inputs = _inputs(tmp_path / "in")
    typo = tmp_path / "typo.toml"
    typo.write_text(PIPELINE.replace("max_tokens", "max_token") + '[output]\ntyp = "text"\n')
    refused = promptmill("run", str(inputs["jsonl"]), "--pipeline", str(typo), env=env)
    assert refused.returncode == 2
    assert "max_token: unknown key; did you mean 'max_tokens'?" in refused.stderr, refused.stderr
    assert "output.typ: unknown key; did you mean 'type'?" in refused.stderr
    pipeline = tmp_path / "p.toml"
    pipeline.write_text(PIPELINE)
    wrong_id = promptmill("run", str(inputs["csv"]), "--pipeline", str(pipeline), "--id-column", "SKU", env=env)
    assert wrong_id.returncode == 2 and "'SKU' is not a column of the input" in wrong_id.stderr
    assert "did you mean 'sku'?" in wrong_id.stderr
    assert fake_api.log() == []


def test_a_local_model_not_built_misspelt_or_not_a_model_folder_is_refused_at_submit(tmp_path, env):
    inputs = _inputs(tmp_path / "in")
    not_a_model = tmp_path / "weights"
    not_a_model.mkdir()
    env = {**env, "PROMPTMILL_MODELS_DIR": str(tmp_path / "no-models")}
    for model, said in (
        ("gemma-270m", "did you mean 'gemma3-270m'?"),
        ("smollm2-135m-instruct", "is not built at"),
        (str(not_a_model), "not a model folder"),
    ):
        pipeline = tmp_path / "local.toml"
        pipeline.write_text(PIPELINE.replace("claude-haiku-4-5", model))
        for command in ("run", "submit"):
            refused = promptmill(command, str(inputs["jsonl"]), "--pipeline", str(pipeline), "--backend", "vllm", env=env)
            assert refused.returncode == 2, (model, command, refused.stderr)
            assert "model: " in refused.stderr and said in refused.stderr, refused.stderr
            assert not refused.stdout  # no job was made


def test_results_carry_the_input_id_and_kept_columns_and_exports_flatten_a_json_output_into_typed_columns(
    tmp_path, env, fake_api
):
    rows = [
        {"sku": f"A-{i}", "description": f"item {i}", "price": i * 1.5,
         "answer": json.dumps({"merchant": f"shop {i}", "total": i * 2.5, "items": i, "paid": i % 2 == 0, "tags": ["x"]})}
        for i in range(8)
    ]  # fmt: skip
    rows[3]["answer"] = "not json"  # a failed row carries its id too
    pipeline = PIPELINE.replace("max_tokens = 16", "max_tokens = 200\nid_column = \"sku\"") + """
[output]
type = "json"
schema = { type = "object", properties = { merchant = { type = "string" }, total = { type = "number" }, items = { type = "integer" }, paid = { type = "boolean" }, tags = { type = "array" } } }
"""
    data, pipeline_path = write_dataset(tmp_path, rows, pipeline)
    out = tmp_path / "out"
    ran = promptmill("run", str(data), "--pipeline", str(pipeline_path), "--out", str(out), "--keep-columns", "price", env=env)
    assert ran.returncode == 0, ran.stderr
    records = read_jsonl(out / "results.jsonl")
    assert [(r["sku"], r["price"]) for r in records] == [(row["sku"], row["price"]) for row in rows]
    assert list(records[0])[:3] == ["sku", "price", "row"]  # the carried columns first, under their own names
    assert records[3]["status"] == "failed" and records[3]["sku"] == "A-3"
    assert read_jsonl(out / "failures.jsonl")[0]["sku"] == "A-3"
    job_id = job_id_of(ran)
    for fmt in ("csv", "parquet"):
        exported = promptmill("export", job_id, "--format", fmt, "--out", str(tmp_path / fmt), env=env)
        assert exported.returncode == 0, exported.stderr
    table = pq.read_table(tmp_path / "parquet" / "results.parquet")
    types = {field.name: str(field.type) for field in table.schema}
    assert types["sku"] == "string" and types["price"] == "double"
    assert (types["output.merchant"], types["output.total"], types["output.items"], types["output.paid"]) == (
        "string", "double", "int64", "bool")
    assert types["output.tags"] == "string" and types["started_at"] == "timestamp[ms, tz=UTC]"
    assert types["ttft_ms"] == "double"
    first = table.slice(0, 1).to_pylist()[0]
    assert (first["output.merchant"], first["output.total"], first["output.items"], first["output.paid"]) == ("shop 0", 0.0, 0, True)
    assert json.loads(first["output.tags"]) == ["x"]
    assert table.column("output.merchant").to_pylist()[3] is None
    import csv

    reported = promptmill("report", job_id, "--out", str(tmp_path / "report"), env=env)
    assert reported.returncode == 0, reported.stderr
    page = (tmp_path / "report" / "report.html").read_text()
    assert "<h3>merchant: 7 distinct values</h3>" in page and "<td>shop 1</td><td>1</td>" in page
    assert "<h3>paid: 2 distinct values</h3>" in page and "<td>true</td><td>4</td>" in page
    assert len(page) < 200_000  # plotly's script is beside it, shared, not inside it
    with (tmp_path / "csv" / "results.csv").open() as handle:
        csv_rows = list(csv.DictReader(handle))
    assert list(csv_rows[0])[:2] == ["sku", "price"]
    assert [r["output.merchant"] for r in csv_rows][:3] == ["shop 0", "shop 1", "shop 2"]


FAILING = PIPELINE.replace("[[reply:{answer}]]", "{marker} [[reply:fine]]")


def test_a_run_where_most_rows_fail_stops_after_100_and_one_where_all_fail_exits_1_with_failures_by_kind(
    tmp_path, env, fake_api
):
    few = [{"description": f"item {i}", "marker": "[[status:400]]"} for i in range(5)]
    data, pipeline = write_dataset(tmp_path / "few", few, FAILING)
    ran = promptmill("run", str(data), "--pipeline", str(pipeline), "--out", str(tmp_path / "few-out"), env=env)
    assert ran.returncode == 1, ran.stderr
    assert "every row failed (5)" in ran.stderr and "invalid_request: 5 (row 0: 400" in ran.stderr, ran.stderr
    assert len(read_jsonl(tmp_path / "few-out" / "failures.jsonl")) == 5  # exported before it exits

    # 600 rows, 2 of 3 refused: the run stops once 100 rows are judged, far short of paying for all.
    many = [{"description": f"item {i}", "marker": "[[status:400]]" if i % 3 else ""} for i in range(600)]
    data, pipeline = write_dataset(tmp_path / "many", many, FAILING)
    fake_api.configure(latency_ms=300)  # slow enough that the run is still going when 100 rows are done
    ran = promptmill("run", str(data), "--pipeline", str(pipeline), "--chunk-size", "20", "--workers", "1",
                     "--out", str(tmp_path / "many-out"), "--json", env=env)  # fmt: skip
    assert ran.returncode == 1, ran.stderr
    summary = json.loads(ran.stdout)
    assert summary["state"] == "failed" and "more than --max-failed-share 0.5" in summary["reason"], summary
    assert summary["exit_code"] == 1 and "invalid_request" in ran.stderr
    status = json.loads(promptmill("status", summary["job_id"], "--json", env=env).stdout)
    assert status["pending"] > 0 and status["done"] + status["failed"] >= 100  # stopped, the rest unsent
    assert len(fake_api.log()) < 5 + 600

    # A share the user allows lets the job finish.
    fake_api.configure(latency_ms=0)
    allowed = promptmill("resume", summary["job_id"], "--max-failed-share", "0.9", env=env)
    assert allowed.returncode == 0, allowed.stderr
    assert "400 ok, 200 failed" not in allowed.stderr and " 200 ok, 400 failed of 600 rows" in allowed.stderr


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_an_outage_pauses_the_job_instead_of_failing_rows_and_resume_finishes_it(tmp_path, env, fake_api):
    rows = [{"description": f"item {i}", "answer": f"answer {i}"} for i in range(30)]
    data, pipeline = write_dataset(tmp_path, rows, PIPELINE)
    down = {**env, "ANTHROPIC_BASE_URL": f"http://127.0.0.1:{_closed_port()}", "PROMPTMILL_OUTAGE_PAUSE_S": "2",
            "PROMPTMILL_MAX_ATTEMPTS": "2"}  # fmt: skip
    ran = promptmill("run", str(data), "--pipeline", str(pipeline), "--out", str(tmp_path / "out"), env=down)
    assert ran.returncode == 4, ran.stderr
    job_id = job_id_of(ran)
    assert f"job {job_id} paused: outage: no answer from" in ran.stderr
    status = json.loads(promptmill("status", job_id, "--json", env=env).stdout)
    assert status["state"] == "paused" and status["reason"].startswith("outage: no answer from"), status
    assert "connection failed" in status["reason"] and f"promptmill resume {job_id}" in status["reason"]
    assert (status["failed"], status["done"]) == (0, 0)  # no row was burnt by the outage
    listed = json.loads(promptmill("jobs", "--json", env=env).stdout)["jobs"]
    assert {"job_id": job_id, "state": "paused", "ok": 0, "failed": 0, "total": 30}.items() <= next(
        job for job in listed if job["job_id"] == job_id).items()

    resumed = promptmill("resume", job_id, env=env)  # the API is back
    assert resumed.returncode == 0, resumed.stderr
    records = read_jsonl(tmp_path / "out" / "results.jsonl")
    assert [r["output"] for r in records] == [f"answer {i}" for i in range(30)]
    assert all(r["status"] == "ok" for r in records)


def test_every_command_has_an_example_in_its_help_no_type_placeholders_and_there_is_a_version():
    from typer.testing import CliRunner

    from promptmill.cli import EXAMPLES, app

    runner = CliRunner()
    names = [command.name or command.callback.__name__.replace("_", "-") for command in app.registered_commands]
    assert set(names) == set(EXAMPLES), set(names) ^ set(EXAMPLES)
    for name in ["", *names]:
        shown = runner.invoke(app, [*([name] if name else []), "--help"], env={"COLUMNS": "80"}, terminal_width=80)
        assert shown.exit_code == 0, (name, shown.output)
        assert "<bool>" not in shown.output and "<int" not in shown.output and "<str>" not in shown.output, shown.output
        if name:
            assert "Examples:" in shown.output and f"promptmill {name}" in shown.output, shown.output
    version = runner.invoke(app, ["--version"])
    assert version.exit_code == 0 and version.output.startswith("promptmill 0.")


def test_init_writes_a_commented_starter_pipeline_of_each_output_that_loads(tmp_path):
    from promptmill.pipelines import load_pipeline

    for output in ("text", "choice", "json"):
        path = tmp_path / f"{output}.toml"
        made = promptmill("init", str(path), "--output", output, env={**os.environ}, cwd=tmp_path)
        assert made.returncode == 0, made.stderr
        pipeline = load_pipeline(path)
        assert pipeline.output.type == output and pipeline.columns == ["text"]
        assert "# The user turn: {column} is filled" in path.read_text()
        again = promptmill("init", str(path), env={**os.environ}, cwd=tmp_path)
        assert again.returncode == 2 and "exists" in again.stderr


def test_the_old_format_flag_still_reads_the_input_with_a_note_and_tables_fit_80_columns(tmp_path, env, fake_api):
    rows = [{"description": f"item {i}", "answer": f"answer {i}"} for i in range(3)]
    data, pipeline = write_dataset(tmp_path, rows, PIPELINE, name="rows.txt")
    ran = promptmill("run", str(data), "--pipeline", str(pipeline), "--format", "jsonl", "--out", str(tmp_path / "o"), env=env)
    assert ran.returncode == 0, ran.stderr
    assert "`--format` for the input is now `--input-format`" in ran.stderr
    job_id = job_id_of(ran)
    for command in (["cost", job_id], ["jobs"], ["status", job_id]):
        shown = promptmill(*command, env={**env, "COLUMNS": "80"})
        assert shown.returncode == 0, shown.stderr
        assert "…" not in shown.stdout and all(len(line) <= 80 for line in shown.stdout.splitlines()), shown.stdout
        if command[0] != "jobs":  # `jobs` may fold a model's name among long job ids: folded, never cut
            assert "claude-haiku-4-5" in shown.stdout, shown.stdout


def test_an_answer_cut_at_max_tokens_says_so_in_its_error(tmp_path, env, fake_api):
    rows = [{"description": "a receipt", "answer": '{"merchant": "a shop whose name goes on and on and on"}'}]
    pipeline = PIPELINE.replace("max_tokens = 16", "max_tokens = 4") + (
        '[output]\ntype = "json"\nschema = { type = "object", properties = { merchant = { type = "string" } } }\n'
    )
    data, pipeline_path = write_dataset(tmp_path, rows, pipeline)
    ran = promptmill("run", str(data), "--pipeline", str(pipeline_path), "--out", str(tmp_path / "out"), env=env)
    assert ran.returncode == 1  # its only row failed
    record = read_jsonl(tmp_path / "out" / "results.jsonl")[0]
    assert record["finish_reason"] == "max_tokens" and record["error"]["kind"] == "unparseable_output"
    assert record["error"]["message"].startswith("the answer was cut at max_tokens (4) before its end; raise max_tokens")


def test_estimate_for_the_local_engine_counts_offline_with_the_model_s_tokenizer_and_prices_device_time(tmp_path, env):
    from transformers import AutoTokenizer

    from promptmill.config.settings import Settings

    rows = [{"description": f"a review of item {i} " * (i + 1), "answer": "ok"} for i in range(12)]
    data, pipeline = write_dataset(tmp_path, rows, PIPELINE.replace("claude-haiku-4-5", "smollm2-135m-instruct"))
    offline = {k: v for k, v in env.items() if not k.startswith("ANTHROPIC_")} | {"HF_HUB_OFFLINE": "1"}
    shown = promptmill("estimate", str(data), "-p", str(pipeline), "--backend", "vllm", "--json", env=offline)
    assert shown.returncode == 0, shown.stderr
    figures = json.loads(shown.stdout)
    tokenizer = AutoTokenizer.from_pretrained(Settings().models_dir / "SmolLM2-135M-Instruct")
    def tokens(row: dict) -> int:
        chat = [{"role": "user", "content": f"Describe {row['description']} [[reply:ok]]"}]
        ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
        return len(ids if isinstance(ids, list) else ids["input_ids"])

    expected = sum(tokens(row) for row in rows)
    assert (figures["input_tokens"], figures["input_tokens_error_pct"], figures["rows_counted"]) == (expected, 0.0, 12)
    speed = figures["engine"]
    device_s = expected / speed["input_tokens_per_s"] + 12 * 16 / speed["output_tokens_per_s"]
    assert abs(figures["cost_usd_high"] - device_s * 2.5 / 3600) < 1e-6  # PROMPTMILL_GPU_HOUR_USD's default
