"""What a user hands promptmill: inputs of every shape, pipelines that cannot work, job ids that do not
exist. Each is read or refused with a clear message, never a traceback, and a bad row fails alone."""

from __future__ import annotations

import hashlib
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from promptmill.cli import app
from promptmill.jobs.readers import InvalidRow, iter_rows
from promptmill.jobs.state.store import JobStore
from promptmill.pipelines import load_pipeline, render_request
from tests.conftest import promptmill, read_jsonl
from tests.test_api_jobs import PIPELINE, job_id_of, write_job

ROW_PIPELINE = PIPELINE.replace('prompt = "Item {id}: {text} [[reply:{answer}]]"', 'prompt = "{text} [[reply:{answer}]]"')


def test_a_csv_field_over_128k_characters_is_read(tmp_path):
    data = tmp_path / "big.csv"
    big = "x" * 300_000
    data.write_text(f"text,answer\n{big},positive\nsmall,negative\n")
    rows = [row for _, _, row in iter_rows(data, "csv")]
    assert rows == [{"text": big, "answer": "positive"}, {"text": "small", "answer": "negative"}]


def test_a_row_with_no_end_is_skipped_unread_and_memory_stays_bounded_by_max_row_bytes(tmp_path):
    """A 40 MB line with no line end, or a CSV quote never closed, with a 1 MiB limit: the row fails
    alone, reading goes on from the next line, and the reader never holds more than a few limits."""
    import tracemalloc

    limit, huge = 1 << 20, b"x" * (40 << 20)
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_bytes(b'{"text": "before"}\n{"text": "' + huge + b'"}\n{"text": "after"}\n')
    csv_file = tmp_path / "rows.csv"
    csv_file.write_bytes(b'id,text\n1,before\n2,"a quote never closed\n' + huge + b"\n3,after\n")
    array = tmp_path / "rows.json"  # an array's item of 40 MB, with brackets, commas and escapes in its strings
    array.write_bytes(b'[{"text": "before"},\n {"text": "' + huge + b'", "more": ["]", "\\"}", {}]},\n {"text": "after"}]')
    for data, fmt, before, after in (
        (jsonl, "jsonl", {"text": "before"}, {"text": "after"}),
        (csv_file, "csv", {"id": "1", "text": "before"}, {"id": "3", "text": "after"}),
        (array, "json", {"text": "before"}, {"text": "after"}),
    ):
        tracemalloc.start()
        try:
            rows = list(iter_rows(data, fmt, max_row_bytes=limit))
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert [row for _, _, row in rows][0::2] == [before, after], fmt
        failed = rows[1][2]
        assert isinstance(failed, InvalidRow) and "over PROMPTMILL_MAX_ROW_BYTES (1,048,576)" in failed.reason
        assert [number for number, _, _ in rows] == [0, 1, 2]
        assert rows[2][1] == {"jsonl": 3, "csv": 5, "json": 3}[fmt], rows  # the line (or item) the next row starts on
        assert peak < 6 * limit, f"{fmt}: the reader held {peak:,} bytes at its peak"

    # A batch file's check reads its lines under the same limit: the long one is named, never held.
    from promptmill.jobs.batch_files import BatchFileError, check_batch_file

    batch = tmp_path / "requests.jsonl"
    request = {"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "m", "messages": []}}
    batch.write_bytes(json.dumps(request).encode() + b"\n" + json.dumps({**request, "custom_id": "r2"}).encode()[:-2]
                      + b', "pad": "' + huge + b'"}}\n')  # fmt: skip
    tracemalloc.start()
    try:
        with pytest.raises(BatchFileError, match="line 2: over PROMPTMILL_MAX_ROW_BYTES"):
            check_batch_file(batch, limit)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 6 * limit, f"the batch file's check held {peak:,} bytes at its peak"


def test_a_utf8_bom_starts_a_jsonl_file_without_failing_its_first_row(tmp_path):
    data = tmp_path / "bom.jsonl"
    data.write_bytes(b'\xef\xbb\xbf{"text": "first"}\n{"text": "second"}\n')
    assert [row for _, _, row in iter_rows(data, "jsonl")] == [{"text": "first"}, {"text": "second"}]


def test_a_json_file_holding_an_array_is_read_as_rows_and_its_input_hash_covers_the_file(tmp_path):
    data = tmp_path / "rows.json"
    raw = json.dumps([{"text": "a"}, 7, {"text": "c"}]).encode()
    data.write_bytes(raw)
    digest = hashlib.sha256()
    rows = list(iter_rows(data, "json", digest=digest))
    assert [row for _, _, row in rows][0::2] == [{"text": "a"}, {"text": "c"}]
    assert isinstance(rows[1][2], InvalidRow) and "item 2" in rows[1][2].reason
    assert [line for _, line, _ in rows] == [1, 2, 3]
    assert digest.hexdigest() == hashlib.sha256(raw).hexdigest()
    assert [number for number, _, _ in iter_rows(data, "json", skip=2)] == [2]


def test_nested_parquet_values_go_into_the_prompt_as_json(tmp_path):
    data = tmp_path / "nested.parquet"
    table = pa.Table.from_pylist([{"doc": {"title": "Ünïcode", "tags": ["a", "b"]}, "n": 1}])
    pq.write_table(table, data)
    pipeline = tmp_path / "p.toml"
    pipeline.write_text('name = "n"\nmodel = "claude-haiku-4-5"\nprompt = "Doc: {doc}"\nmax_tokens = 4\n')
    (_, line, row), = iter_rows(data, "parquet")
    prompt = render_request(load_pipeline(pipeline), 0, row, line).prompt
    assert prompt == 'Doc: {"title":"Ünïcode","tags":["a","b"]}'


def test_a_row_over_max_row_bytes_fails_alone_with_its_reason(tmp_path, env, fake_api):
    data = tmp_path / "rows.json"
    rows = [{"text": f"row {i}", "answer": "positive"} for i in range(5)]
    rows[2]["text"] = "y" * 5000
    data.write_text(json.dumps(rows))
    pipeline = tmp_path / "p.toml"
    pipeline.write_text(ROW_PIPELINE)
    out = tmp_path / "out"
    env = {**env, "PROMPTMILL_MAX_ROW_BYTES": "4096"}
    result = promptmill("run", str(data), "--pipeline", str(pipeline), "--out", str(out), env=env)
    assert result.returncode == 0, result.stderr
    records = read_jsonl(out / "results.jsonl")
    assert [r["status"] for r in records] == ["ok", "ok", "failed", "ok", "ok"]
    assert records[2]["error"]["kind"] == "invalid_row" and "over PROMPTMILL_MAX_ROW_BYTES (4,096)" in records[2]["error"]["message"]
    assert [r["line"] for r in records] == [1, 2, 3, 4, 5]


def test_a_corrupt_parquet_file_fails_the_job_with_a_message_and_resume_finishes_it_once_fixed(tmp_path, env, fake_api):
    data = tmp_path / "rows.parquet"
    data.write_bytes(b"PAR1 this is not a parquet file at all PAR1")
    pipeline = tmp_path / "p.toml"
    pipeline.write_text(ROW_PIPELINE)
    out = tmp_path / "out"
    result = promptmill("run", str(data), "--pipeline", str(pipeline), "--out", str(out), env=env)
    assert result.returncode == 1
    assert "the producer stopped" in result.stderr and "Traceback" not in result.stderr
    job_id = job_id_of(result)
    status = json.loads(promptmill("status", job_id, "--json", env=env).stdout)
    assert status["state"] == "failed" and "the producer stopped" in status["error"]
    pq.write_table(pa.Table.from_pylist([{"text": f"r{i}", "answer": "negative"} for i in range(10)]), data)
    resumed = promptmill("resume", job_id, env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert [r["output"] for r in read_jsonl(out / "results.jsonl")] == ["negative"] * 10


def test_a_schema_whose_ref_does_not_resolve_or_is_remote_is_refused_at_submit(tmp_path, env):
    data, _ = write_job(tmp_path, 3)
    for ref, message in (("#/$defs/missing", "does not resolve"), ("https://example.com/s.json", "points outside")):
        pipeline = tmp_path / "schema.toml"
        pipeline.write_text(
            'name = "x"\nmodel = "claude-haiku-4-5"\nprompt = "{text}"\nmax_tokens = 8\n[output]\ntype = "json"\n'
            f'schema = {{ type = "object", properties = {{ a = {{ "$ref" = "{ref}" }} }} }}\n'
        )
        result = promptmill("submit", str(data), "--pipeline", str(pipeline), env=env)
        assert result.returncode == 2 and message in result.stderr and "output.schema" in result.stderr, result.stderr
    good = tmp_path / "good.toml"
    good.write_text(
        'name = "x"\nmodel = "claude-haiku-4-5"\nprompt = "{text}"\nmax_tokens = 8\n[output]\ntype = "json"\n'
        'schema = { type = "object", properties = { a = { "$ref" = "#/$defs/s" } }, "$defs" = { s = { type = "string" } } }\n'
    )
    assert load_pipeline(good).output.json_schema["$defs"] == {"s": {"type": "string"}}


def test_a_pipeline_that_is_not_utf8_and_a_chunk_size_over_the_bound_are_refused(tmp_path, env):
    data, pipeline = write_job(tmp_path, 3)
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes(PIPELINE.replace("You label", "Vous étiquetez").encode("latin-1"))
    result = promptmill("submit", str(data), "--pipeline", str(latin1), env=env)
    assert result.returncode == 2 and "is not UTF-8" in result.stderr and "Traceback" not in result.stderr
    huge = promptmill("submit", str(data), "--pipeline", str(pipeline), "--chunk-size", "10001", env=env)
    assert huge.returncode == 2 and "--chunk-size" in huge.stderr


def test_an_unknown_job_id_gives_one_line_and_exit_2_for_every_command(tmp_path, env):
    data, pipeline = write_job(tmp_path, 3)
    commands = [
        ["status", "nope"], ["export", "nope"], ["resume", "nope"], ["cancel", "nope"], ["cost", "nope"],
        ["verify", "nope"], ["delete", "nope"], ["estimate", str(data), "--pipeline", str(pipeline), "--job", "nope"],
    ]  # fmt: skip
    for command in commands:
        result = promptmill(*command, env=env)
        assert result.returncode == 2, (command, result.stderr)
        assert result.stderr.strip().count("\n") == 0 and "no job 'nope'" in result.stderr, (command, result.stderr)


def test_tracebacks_never_print_local_variables():
    # Locals would print the Redis URL (with its password) and the API key held by the CLI's frames.
    assert app.pretty_exceptions_show_locals is False


def test_the_model_make_builds_is_found_from_another_folder_with_another_data_dir(tmp_path, env):
    """`make model` and every command share one models folder, whatever the current folder."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    empty = elsewhere / "none.jsonl"
    empty.write_text("")
    pipeline = elsewhere / "p.toml"
    pipeline.write_text(ROW_PIPELINE)
    env = {k: v for k, v in env.items() if k != "PROMPTMILL_MODELS_DIR"}
    result = promptmill(
        "run", str(empty), "--pipeline", str(pipeline), "--backend", "vllm", "--model", "smollm2-135m-instruct",
        "--out", str(elsewhere / "out"), env=env, cwd=elsewhere,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "not built" not in result.stderr and "done 0 ok" in result.stderr
    store = JobStore.from_url(env["PROMPTMILL_REDIS_URL"])
    assert store.status(job_id_of(result)).state.value == "complete"
