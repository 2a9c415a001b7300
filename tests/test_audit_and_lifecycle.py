"""Every row's audit record, the job's manifest, secrets kept out of logs, and a job's life cycle:
expiry of a finished job's keys, `delete`, `gc` and `jobs`. Real CLI, workers, Redis and SDK."""

from __future__ import annotations

import hashlib
import io
import json
import logging
from datetime import datetime

import redis

from promptmill.config.secret_logging import MASK, mask_secrets_in_logs
from promptmill.config.settings import Settings
from promptmill.jobs.state.keys import JOBS_INDEX, JobKeys
from promptmill.jobs.state.store import JobStore
from tests.conftest import API_KEY, promptmill, read_jsonl
from tests.test_api_jobs import PIPELINE, job_id_of, write_job


def test_each_record_carries_its_audit_fields_and_the_job_writes_a_manifest(tmp_path, env, fake_api):
    fake_api.configure(p500=0.2)
    env = {**env, "PROMPTMILL_MAX_ATTEMPTS": "12"}
    data, pipeline = write_job(tmp_path, 120)
    out = tmp_path / "out"
    result = promptmill("run", str(data), "--pipeline", str(pipeline), "--out", str(out), env=env)
    assert result.returncode == 0, result.stderr
    records = read_jsonl(out / "results.jsonl")
    served = {entry["prompt"]: entry for entry in fake_api.log() if entry["status"] == 200}
    lines = data.read_text().splitlines()
    for record in records:
        assert record["model"] == "claude-haiku-4-5"
        assert record["line"] == record["row"] + 1
        prompt = "Item {id}: {text} [[reply:{answer}]]".format(**json.loads(lines[record["row"]]))
        assert record["request_id"] == served[prompt]["request_id"]
        started, finished = (datetime.fromisoformat(record[k]) for k in ("started_at", "finished_at"))
        assert started.utcoffset().total_seconds() == 0 and started <= finished
        assert 0 < record["latency_ms"] <= (finished - started).total_seconds() * 1000 + 1
        assert len(record["errors"]) == record["attempts"] - 1
        assert all(error["status"] == 500 for error in record["errors"])
    assert sum(len(r["errors"]) for r in records) == sum(1 for e in fake_api.log() if e["status"] == 500) > 0

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["job_id"] == job_id_of(result) and manifest["backend"] == "anthropic"
    assert manifest["models"] == ["claude-haiku-4-5"] and manifest["chunk_size"] == Settings().chunk_size
    assert manifest["pipeline"]["text"] == pipeline.read_text()
    assert manifest["pipeline"]["sha256"] == hashlib.sha256(pipeline.read_bytes()).hexdigest()
    assert manifest["input"]["sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()
    assert manifest["worker_hosts"] and manifest["started_at"] and manifest["finished_at"]
    assert manifest["rows"] == {"total": 120, "ok": 120, "failed": 0}


def test_store_text_false_keeps_only_the_parsed_output(tmp_path, env, fake_api):
    data, _ = write_job(tmp_path, 20)
    pipeline = tmp_path / "quiet.toml"
    pipeline.write_text(PIPELINE.replace('max_tokens = 8\n', 'max_tokens = 8\nstore_text = false\n'))
    out = tmp_path / "out"
    result = promptmill("run", str(data), "--pipeline", str(pipeline), "--out", str(out), env=env)
    assert result.returncode == 0, result.stderr
    records = read_jsonl(out / "results.jsonl")
    assert all(r["text"] is None and r["output"] in ("positive", "negative") for r in records)


def test_secrets_are_masked_by_value_in_every_log_record_and_traceback():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("promptmill.secret-test")
    logger.addHandler(handler)
    password, key = "s3cret-redis-pass", "sk-test-0123456789abcdef"
    mask_secrets_in_logs([key, password])
    logger.warning("connecting to redis://:%s@host:6379/0 with %s", password, key)
    try:
        raise ConnectionError(f"refused redis://:{password}@host")
    except ConnectionError:
        logger.exception("Redis failed")
    text = stream.getvalue()
    assert password not in text and key not in text and text.count(MASK) == 3


def test_a_worker_log_holds_neither_the_api_key_nor_the_redis_password_nor_a_prompt(tmp_path, env, fake_api):
    data, pipeline = write_job(tmp_path, 30)
    out = tmp_path / "out"
    result = promptmill("run", str(data), "--pipeline", str(pipeline), "--out", str(out), env=env)
    assert result.returncode == 0, result.stderr
    password = redis.connection.parse_url(env["PROMPTMILL_REDIS_URL"])["password"]
    logs = "".join(path.read_text() for path in (out / "logs").iterdir())
    assert logs and API_KEY not in logs and password not in logs and "row number 7" not in logs
    assert "HTTP Request" not in logs  # the HTTP stacks' per-request lines are held back too


def test_a_finished_job_s_keys_expire_and_delete_and_gc_remove_jobs(tmp_path, env, fake_api):
    store = JobStore.from_url(env["PROMPTMILL_REDIS_URL"])
    data, pipeline = write_job(tmp_path, 100)
    jobs = []
    for name in ("a", "b"):
        result = promptmill("run", str(data), "--pipeline", str(pipeline), "--out", str(tmp_path / name), env=env)
        assert result.returncode == 0, result.stderr
        jobs.append(job_id_of(result))
    ttl_days = store.redis.ttl(JobKeys(jobs[0]).meta) / 86_400
    assert 6.9 < ttl_days <= 7  # PROMPTMILL_JOB_TTL_DAYS, default 7
    assert all(store.redis.ttl(key) > 0 for key in store.redis.scan_iter(JobKeys(jobs[0]).pattern))
    listed = promptmill("jobs", env=env).stdout
    assert jobs[0] in listed and jobs[1] in listed

    deleted = promptmill("delete", jobs[0], "--files", env=env)
    assert deleted.returncode == 0, deleted.stderr
    assert list(store.redis.scan_iter(JobKeys(jobs[0]).pattern)) == [] and not (tmp_path / "a").exists()
    assert jobs[0] not in promptmill("jobs", env=env).stdout
    assert promptmill("status", jobs[0], env=env).returncode == 2

    kept = promptmill("gc", "--older-than", "1d", env=env)
    assert kept.returncode == 0 and jobs[1] in store.job_ids()
    collected = promptmill("gc", "--older-than", "0s", env=env)
    assert collected.returncode == 0 and jobs[1] not in store.job_ids()
    assert list(store.redis.scan_iter(JobKeys(jobs[1]).pattern)) == []
    assert (tmp_path / "b" / "results.jsonl").exists()  # without --files what it wrote stays


def test_delete_files_removes_only_what_the_job_wrote_in_a_folder_it_shares(tmp_path, env, fake_api):
    """Two jobs and the user's own files in one folder (as with `--out .`): deleting a job with its
    files leaves the other job and the user's files as they were."""
    store = JobStore.from_url(env["PROMPTMILL_REDIS_URL"])
    data, pipeline = write_job(tmp_path / "input", 150)
    shared = tmp_path / "shared"
    (shared / "logs").mkdir(parents=True)
    (shared / "logs" / "x.log").write_text("the user's own log\n")
    (shared / "notes.txt").write_text("the user's own notes\n")
    elsewhere = tmp_path / "elsewhere.txt"
    elsewhere.write_text("not in the folder\n")
    jobs = []
    for _ in range(2):
        result = promptmill("run", str(data), "--pipeline", str(pipeline), "--out", str(shared), env=env)
        assert result.returncode == 0, result.stderr
        jobs.append(job_id_of(result))
    first, second = jobs
    (shared / "shards" / f"{first}.link.jsonl").symlink_to(elsewhere)  # a link among its shards: removed, not followed
    shards = {job_id: sorted((shared / "shards").glob(f"{job_id}.*.jsonl")) for job_id in jobs}
    assert (len(shards[first]), len(shards[second])) == (3 + 1, 3)  # 150 rows in chunks of 64; the link
    second_files = {path: path.read_bytes() for path in
                    [*shards[second], *(shared / "logs").glob(f"{second}.*.log"), shared / "results.jsonl",
                     shared / "failures.jsonl", shared / "manifest.json"]}  # fmt: skip

    deleted = promptmill("delete", first, "--files", env=env)
    assert deleted.returncode == 0, deleted.stderr
    assert list(store.redis.scan_iter(JobKeys(first).pattern)) == []
    assert {path: path.read_bytes() for path in second_files} == second_files  # the other job's, untouched
    assert sorted(p.name for p in (shared / "logs").iterdir()) == sorted(
        ["x.log", *(p.name for p in second_files if p.parent.name == "logs")]
    )
    assert (shared / "notes.txt").read_text() == "the user's own notes\n"
    assert elsewhere.read_text() == "not in the folder\n"
    assert (shared / "shards" / ".job").read_text().split() == [second]
    assert promptmill("verify", second, env=env).returncode == 0  # its shards still read

    deleted = promptmill("delete", second, "--files", env=env)
    assert deleted.returncode == 0, deleted.stderr
    assert sorted(p.relative_to(shared).as_posix() for p in shared.rglob("*")) == ["logs", "logs/x.log", "notes.txt"]


def test_delete_files_keeps_everything_where_the_folder_does_not_name_the_job(tmp_path, env, fake_api):
    store = JobStore.from_url(env["PROMPTMILL_REDIS_URL"])
    data, pipeline = write_job(tmp_path / "input", 20)
    out = tmp_path / "out"
    result = promptmill("run", str(data), "--pipeline", str(pipeline), "--out", str(out), env=env)
    job_id = job_id_of(result)
    (out / "shards" / ".job").write_text("another-job\n")  # the folder is someone else's now
    before = sorted(out.rglob("*"))
    kept = promptmill("delete", job_id, "--files", env=env)
    assert kept.returncode == 1 and "does not name job" in kept.stderr, kept.stderr
    assert sorted(out.rglob("*")) == before and store.exists(job_id)


def test_answers_that_land_after_a_running_job_is_deleted_bring_none_of_its_keys_back(tmp_path, env, fake_api):
    """The job's keys go while 40 answers are on the wire (as when `delete` stops waiting for its
    chunks): the worker drops each late answer, saying so, and writes nothing of the job again."""
    from tests.support import promptmill_process, stop, wait_until

    store = JobStore.from_url(env["PROMPTMILL_REDIS_URL"])
    fake_api.configure(latency_ms=1500)
    data, pipeline = write_job(tmp_path, 40)
    submitted = promptmill("submit", str(data), "--pipeline", str(pipeline), "--chunk-size", "20",
                           "--out", str(tmp_path / "out"), env=env)  # fmt: skip
    job_id = submitted.stdout.split()[-1]
    log_path = tmp_path / "worker.log"
    with log_path.open("w") as log:
        worker = promptmill_process("worker", "--queues", "api", env=env, stdout=log, stderr=log, start_new_session=True)
    try:
        wait_until(lambda: len(fake_api.log()) >= 20, 60, "rows on the wire")
        store.delete_job(job_id)
        wait_until(lambda: log_path.read_text().count("succeeded in") == 2, 60, "both chunks' tasks to end")
    finally:
        stop(worker)
    assert list(store.redis.scan_iter(JobKeys(job_id).pattern)) == []
    assert not store.exists(job_id) and job_id not in store.job_ids()
    assert f"job {job_id} is gone (deleted): the outcome of row" in log_path.read_text()  # answers did land after


def test_jobs_whose_keys_expired_leave_the_index(tmp_path, env, fake_api):
    store = JobStore.from_url(env["PROMPTMILL_REDIS_URL"])
    data, pipeline = write_job(tmp_path, 10)
    result = promptmill("run", str(data), "--pipeline", str(pipeline), "--out", str(tmp_path / "o"), env=env)
    job_id = job_id_of(result)
    store.expire_job(job_id, 0.001)  # as if JOB_TTL_DAYS had passed
    assert store.redis.zscore(JOBS_INDEX, job_id) is not None
    assert job_id not in promptmill("jobs", env=env).stdout
    assert store.redis.zscore(JOBS_INDEX, job_id) is None
