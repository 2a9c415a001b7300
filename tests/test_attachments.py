"""Rows that carry images and documents: the real CLI and workers, the real anthropic and openai SDKs
against the local server, which decodes every file block it is sent (its log keeps each file's
sha256, size and the tokens it billed)."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import redis
from PIL import Image

from examples.receipts.make_receipts import main as make_receipts
from promptmill.jobs.state.embedded import EmbeddedRedis
from tests.conftest import promptmill, read_jsonl
from tests.support import write_dataset
from tests.test_api_jobs import job_id_of
from tests.test_openai import openai_env
from tests.test_python_api import api_env  # noqa: F401 - the fixture: pm reads this process's environment

SCHEMA = """
[output]
type = "json"

[output.schema]
type = "object"
required = ["merchant", "date", "total"]

[output.schema.properties.total]
type = "number"
"""


def pipeline(column: str, kind: str, model: str = "claude-haiku-4-5", prompt: str | None = None, resize: str = "off") -> str:
    prompt = prompt or f"{{{column}}}\\nReceipt {{id}}: merchant, date and total? [[reply:{{answer}}]]"
    return (f'name = "receipts"\nmodel = "{model}"\nprompt = "{prompt}"\nmax_tokens = 100\n\n'
            f'[[attachments]]\ncolumn = "{column}"\nkind = "{kind}"\nresize = "{resize}"\n{SCHEMA}')  # fmt: skip


@pytest.fixture
def receipts(tmp_path) -> list[dict]:
    """The example's receipts, drawn into the test's folder: each row with its file and its answer."""
    make_receipts(tmp_path / "receipts")
    images = read_jsonl(tmp_path / "receipts" / "receipts.jsonl")
    documents = read_jsonl(tmp_path / "receipts" / "receipt-pdfs.jsonl")
    return [{"id": image["id"], "image": f"receipts/{image['image']}", "pdf": f"receipts/{document['pdf']}",
             "answer": json.dumps(image["expected"]), "expected": image["expected"]}
            for image, document in zip(images, documents)]  # fmt: skip


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def answered(log: list[dict]) -> list[dict]:
    return [entry for entry in log if entry["status"] == 200]


def run(env: dict[str, str], data: Path, pipeline_path: Path, out: Path, *extra: str):
    result = promptmill("run", str(data), "--pipeline", str(pipeline_path), "--out", str(out), *extra, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_images_reach_the_server_as_image_blocks_of_the_files_bytes_and_a_missing_file_fails_its_row_alone(
    tmp_path, env, fake_api, receipts
):
    rows = [{k: v for k, v in row.items() if k != "pdf"} for row in receipts]
    rows[1]["image"] = "file://" + str(tmp_path / rows[1]["image"])  # a file:// URL reads the same, where allowed
    rows.append({"id": "gone", "image": "receipts/nowhere.png", "answer": "{}", "expected": None})
    data, pipeline_path = write_dataset(tmp_path, rows, pipeline("image", "image"))
    out = tmp_path / "out"
    result = run({**env, "PROMPTMILL_ATTACHMENT_ROOTS": str(tmp_path / "receipts")}, data, pipeline_path, out)

    records = read_jsonl(out / "results.jsonl")
    assert [r["status"] for r in records] == ["ok"] * 4 + ["failed"]
    assert [r["output"] for r in records[:4]] == [row["expected"] for row in receipts]
    missing = records[4]["error"]
    assert missing["kind"] == "attachment_error" and str(tmp_path / "receipts" / "nowhere.png") in missing["message"]
    log = answered(fake_api.log())
    assert len(fake_api.log()) == 4  # the missing file's row was never sent
    files = {tmp_path / row["image"] for row in receipts}
    by_hash = {sha256(path): path for path in files}
    for entry in log:
        (sent,) = entry["files"]
        assert sent["type"] == "image" and sent["sha256"] in by_hash
        assert sent["media_type"] == ("image/png" if by_hash[sent["sha256"]].suffix == ".png" else "image/jpeg")
    assert {entry["files"][0]["sha256"] for entry in log} == set(by_hash)
    # The audit record proves which file went: its sha256, size and type, never its bytes.
    for record, row in zip(records[:4], receipts):
        (audit,) = record["attachments"]
        path = tmp_path / row["image"]
        assert audit == {"column": "image", "sha256": sha256(path), "size": path.stat().st_size,
                         "media_type": "image/png" if path.suffix == ".png" else "image/jpeg"}  # fmt: skip
    # The ledger bills what the server billed: the images' tokens included.
    status = json.loads(promptmill("status", job_id_of(result), "--json", env=env).stdout)
    assert status["tokens"]["input"] == sum(entry["usage"]["input_tokens"] for entry in log)
    assert all(entry["files"][0]["tokens"] > 100 for entry in log)


def test_a_rows_file_is_read_only_inside_the_datas_folder_or_an_allowed_root(tmp_path, env, fake_api, receipts):
    """A downloaded dataset names the worker's secrets every way it can: a symlink shipped with the
    data, `../`, `file://`, `~`, an absolute path, http://, a link-local URL, a bucket, a text file
    named .png. Only the good image is sent; every other row fails alone, naming its path."""
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "id_rsa.png").write_bytes((tmp_path / receipts[0]["image"]).read_bytes())  # an image, so kind checks pass
    data_dir = tmp_path / "data"
    (data_dir / "img").mkdir(parents=True)
    good = data_dir / "img" / "good.png"
    good.write_bytes((tmp_path / receipts[1]["image"]).read_bytes())
    (data_dir / "img" / "evil.png").symlink_to(secret / "id_rsa.png")
    (data_dir / "img" / "out").symlink_to(secret, target_is_directory=True)
    (data_dir / "img" / "fake.png").write_text("a text file, named as an image\n")
    (data_dir / "img" / "broken.png").write_bytes(good.read_bytes()[:200])  # a PNG's header, its pixels cut off
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "key.png").write_bytes((secret / "id_rsa.png").read_bytes())
    answer = json.dumps({"merchant": "m", "date": "d", "total": 1})
    bad = {
        "symlink": "img/evil.png",
        "symlinked folder": "img/out/id_rsa.png",
        "dotdot": "../secret/id_rsa.png",
        "file url": "file://" + str(secret / "id_rsa.png"),
        "absolute": str(secret / "id_rsa.png"),
        "home": "~/.ssh/key.png",
        "http": "http://169.254.169.254/latest/meta-data/x.png",
        "bucket": "s3://someone-elses-bucket/x.png",
        "fake": "img/fake.png",
        "broken": "img/broken.png",
    }
    rows = [{"id": "good", "image": "img/good.png", "answer": answer}]
    rows += [{"id": name, "image": value, "answer": answer} for name, value in bad.items()]
    data, pipeline_path = write_dataset(data_dir, rows, pipeline("image", "image", resize="auto"))
    out = tmp_path / "out"
    run({**env, "HOME": str(home)}, data, pipeline_path, out)
    records = read_jsonl(out / "results.jsonl")
    assert [r["status"] for r in records] == ["ok"] + ["failed"] * len(bad)
    for record, (name, value) in zip(records[1:], bad.items()):
        assert record["error"]["kind"] == "attachment_error", (name, record["error"])
        assert value in record["error"]["message"], (name, record["error"]["message"])
    assert "unknown type" in records[-2]["error"]["message"]  # its bytes say what it is, not its name
    assert "not a readable image" in records[-1]["error"]["message"]
    sent = answered(fake_api.log())
    assert len(fake_api.log()) == 1 and [entry["files"][0]["sha256"] for entry in sent] == [sha256(good)]

    # The operator's opt-in opens a folder (and only it): the absolute path and the file:// row go.
    fake_api.reset()
    allowed = {**env, "HOME": str(home), "PROMPTMILL_ATTACHMENT_ROOTS": f"{secret}, s3://my-bucket"}
    run(allowed, data, pipeline_path, tmp_path / "allowed")
    records = {row["id"]: r for row, r in zip(rows, read_jsonl(tmp_path / "allowed" / "results.jsonl"))}
    opened = {"symlink", "symlinked folder", "dotdot", "file url", "absolute"}
    assert {name for name, record in records.items() if record["status"] == "ok"} == {"good", *opened}
    assert "PROMPTMILL_ATTACHMENT_ROOTS" in records["bucket"]["error"]["message"]


def test_the_worker_refuses_a_file_the_spec_in_redis_was_rewritten_to_reach(tmp_path, env, fake_api, receipts):
    """A chunk whose reference was rewritten in Redis (a path outside the data's folder, a file with no
    sha256) fails its row at the worker: it re-checks what it reads, whatever the producer recorded."""
    from promptmill.config.settings import Settings
    from promptmill.pipelines.attachments import AttachmentError, load
    from promptmill.pipelines.file_access import Access
    from promptmill.pipelines.items import AttachmentRef

    outside = tmp_path / "elsewhere.png"
    outside.write_bytes((tmp_path / receipts[0]["image"]).read_bytes())
    data, pipeline_path = write_dataset(tmp_path / "receipts", [{"id": 1, "image": "x.png"}], pipeline("image", "image"))
    access = Access.of(data.parent, Settings(_env_file=None), self_hosted=False)
    inside = AttachmentRef(column="image", kind="image", source=str(tmp_path / receipts[1]["image"]))
    with pytest.raises(AttachmentError, match="sha256"):
        load(inside, str(data), 1, None, False, access)
    ref = AttachmentRef(column="image", kind="image", source=str(outside), sha256=sha256(outside))
    with pytest.raises(AttachmentError, match="outside the data's folder"):
        load(ref, str(data), 1, None, False, access)
    for url in ("http://169.254.169.254/x.png", "ftp://host/x.png", "s3://bucket/x.png"):
        with pytest.raises(AttachmentError):
            load(ref.model_copy(update={"source": url}), str(data), 1, None, False, access)
    assert load(ref, str(data), 1, None, False, Access.of(data.parent, Settings(_env_file=None, attachment_roots=str(tmp_path)), False)).data
    # A self-hosted server fetches an https URL itself: only from the hosts allowed.
    hosted = Access.of(data.parent, Settings(_env_file=None, attachment_url_hosts="images.example.com"), self_hosted=True)
    url = ref.model_copy(update={"source": "https://169.254.169.254/x.png"})
    with pytest.raises(AttachmentError, match="PROMPTMILL_ATTACHMENT_URL_HOSTS"):
        load(url, str(data), 1, None, False, hosted)
    assert load(url.model_copy(update={"source": "https://images.example.com/x.png"}), "", 1, None, False, hosted).url


def test_the_image_goes_where_the_prompt_names_it_else_before_the_text(tmp_path, env, fake_api, receipts):
    rows = [{k: v for k, v in row.items() if k != "pdf"} for row in receipts[:1]]
    between = "Look at this: {image} What is the total? [[reply:{answer}]]"
    data, pipeline_path = write_dataset(tmp_path, rows, pipeline("image", "image", prompt=between), name="a.jsonl")
    run(env, data, pipeline_path, tmp_path / "a")
    absent = "What is the total? [[reply:{answer}]]"
    data, pipeline_path = write_dataset(tmp_path, rows, pipeline("image", "image", prompt=absent), name="b.jsonl")
    run(env, data, pipeline_path, tmp_path / "b")
    first, second = answered(fake_api.log())
    assert [block["type"] for block in first["blocks"]] == ["text", "image", "text"]
    assert first["blocks"][0]["text"] == "Look at this: "
    assert [block["type"] for block in second["blocks"]] == ["image", "text"]


def test_pdfs_go_as_document_blocks_and_through_chat_completions_as_image_url_and_file_parts(
    tmp_path, env, fake_api, receipts
):
    data, pipeline_path = write_dataset(tmp_path, receipts, pipeline("pdf", "document"))
    run(env, data, pipeline_path, tmp_path / "out")
    log = answered(fake_api.log())
    assert len(log) == 4 and all(entry["files"][0]["type"] == "document" for entry in log)
    assert {entry["files"][0]["sha256"] for entry in log} == {sha256(tmp_path / row["pdf"]) for row in receipts}
    assert all(entry["files"][0]["pages"] == 1 for entry in log)

    fake_api.reset()
    both = pipeline("image", "image", model="gpt-4.1-mini").replace(
        "[output]", '[[attachments]]\ncolumn = "pdf"\nkind = "document"\n\n[output]'
    )
    data, pipeline_path = write_dataset(tmp_path, receipts, both, name="openai.jsonl")
    run(openai_env(env), data, pipeline_path, tmp_path / "openai", "--backend", "openai")
    log = answered(fake_api.log())
    assert len(log) == 4 and all(entry["route"] == "chat" for entry in log)
    for entry in log:
        image, document = entry["files"]
        assert image["type"] == "image" and document["type"] == "document" and document["media_type"] == "application/pdf"
    assert {entry["files"][0]["sha256"] for entry in log} == {sha256(tmp_path / row["image"]) for row in receipts}
    assert {entry["files"][1]["sha256"] for entry in log} == {sha256(tmp_path / row["pdf"]) for row in receipts}
    records = read_jsonl(tmp_path / "openai" / "results.jsonl")
    assert [r["output"] for r in records] == [row["expected"] for row in receipts]


def noise_png(path: Path, side: int) -> Path:
    """A PNG that does not compress: random pixels, about 3 bytes each."""
    rng = random.Random(side)
    Image.frombytes("RGB", (side, side), rng.randbytes(side * side * 3)).save(path)
    return path


def test_an_image_over_the_providers_limit_fails_its_row_unless_resize_auto_sends_it_at_its_best_size(
    tmp_path, env, fake_api
):
    big = noise_png(tmp_path / "big.png", 1400)
    assert big.stat().st_size > 5 * 1024 * 1024
    rows = [{"id": 1, "image": "big.png", "answer": json.dumps({"merchant": "m", "date": "d", "total": 1})}]
    data, strict = write_dataset(tmp_path, rows, pipeline("image", "image"))
    out = tmp_path / "strict"
    promptmill("run", str(data), "--pipeline", str(strict), "--out", str(out), env=env)
    (record,) = read_jsonl(out / "results.jsonl")
    assert record["status"] == "failed" and record["error"]["kind"] == "attachment_error"
    assert "big.png" in record["error"]["message"] and "5 MiB" in record["error"]["message"]
    assert fake_api.log() == []  # refused here, before anything was paid

    strict.write_text(pipeline("image", "image", resize="auto"))
    run(env, data, strict, tmp_path / "auto")
    (record,) = read_jsonl(tmp_path / "auto" / "results.jsonl")
    assert record["status"] == "ok"
    (sent,) = fake_api.log()[0]["files"]
    assert sent["size"] <= 5 * 1024 * 1024 and sent["width"] * sent["height"] <= 1_150_000 and sent["width"] == sent["height"]
    assert record["attachments"][0]["sha256"] == sha256(big)  # the record names the file given, not the copy sent


def test_the_estimate_counts_image_tokens_within_10_percent_of_what_the_server_bills(tmp_path, env, fake_api, receipts):
    rows = [{k: v for k, v in row.items() if k != "pdf"} for row in receipts]
    Image.new("RGB", (3000, 2000), "white").save(tmp_path / "photo.jpg")  # scaled down by the rule
    Image.new("RGB", (800, 600), "white").save(tmp_path / "shot.png")
    rows += [{"id": "photo", "image": "photo.jpg", "answer": "{}"}, {"id": "shot", "image": "shot.png", "answer": "{}"}]
    data, pipeline_path = write_dataset(tmp_path, rows, pipeline("image", "image"))
    estimate = promptmill("estimate", str(data), "--pipeline", str(pipeline_path), "--json", env=env)
    assert estimate.returncode == 0, estimate.stderr
    figures = json.loads(estimate.stdout)
    fake_api.reset()
    promptmill("run", str(data), "--pipeline", str(pipeline_path), "--out", str(tmp_path / "out"), env=env)
    billed = sum(entry["usage"]["input_tokens"] for entry in answered(fake_api.log()))
    assert len(answered(fake_api.log())) == 6
    assert figures["image_tokens"] > 0.8 * billed  # the images are most of the bill
    assert abs(figures["input_tokens"] - billed) <= 0.1 * billed, (figures, billed)


def test_a_parquet_binary_column_is_hashed_at_submit_and_read_from_the_file_when_sent(tmp_path, env, fake_api, receipts):
    images = [(tmp_path / row["image"]).read_bytes() for row in receipts]
    table = pa.table({"id": [row["id"] for row in receipts], "image": images, "answer": [row["answer"] for row in receipts]})
    data = tmp_path / "rows.parquet"
    pq.write_table(table, data, row_group_size=3)  # two row groups: a row is found in its own
    pipeline_path = tmp_path / "p.toml"
    pipeline_path.write_text(pipeline("image", "image"))
    run(env, data, pipeline_path, tmp_path / "out")
    records = read_jsonl(tmp_path / "out" / "results.jsonl")
    assert [r["output"] for r in records] == [row["expected"] for row in receipts]
    hashes = [hashlib.sha256(image).hexdigest() for image in images]
    assert [r["attachments"][0]["sha256"] for r in records] == hashes
    assert sorted(entry["files"][0]["sha256"] for entry in answered(fake_api.log())) == sorted(hashes)


def test_rows_with_files_cost_redis_their_reference_not_their_bytes(tmp_path, env, receipts):
    """As many rows of text and of images submitted (no worker takes them): an image row costs Redis
    a few hundred bytes more than a text row, not its file's 13 KB."""
    own = EmbeddedRedis(tmp_path / "redis")
    env = {**env, "PROMPTMILL_REDIS_URL": own.start()}
    client = redis.Redis.from_url(env["PROMPTMILL_REDIS_URL"])
    rows = 4000
    text = [{"id": i, "text": f"receipt {i} from Blue Kettle Cafe, total 6.20", "answer": "{}"} for i in range(rows)]
    images = [{"id": i, "image": receipts[i % 4]["image"], "answer": "{}"} for i in range(rows)]
    text_pipeline = pipeline("image", "image").split("[[attachments]]")[0].replace("{image}", "{text}") + SCHEMA
    per_row = {}
    try:
        for name, data_rows, body in (("text", text, text_pipeline), ("image", images, pipeline("image", "image"))):
            data, pipeline_path = write_dataset(tmp_path, data_rows, body, name=f"{name}.jsonl")
            before = client.info("memory")["used_memory"]
            submitted = promptmill("submit", str(data), "--pipeline", str(pipeline_path), "--out", str(tmp_path / name), env=env)
            assert submitted.returncode == 0, submitted.stderr
            per_row[name] = (client.info("memory")["used_memory"] - before) / rows
    finally:
        own.stop()
    print(f"Redis bytes a row: text {per_row['text']:.0f}, image {per_row['image']:.0f}")  # -s shows it
    assert per_row["image"] <= per_row["text"] + 400, per_row
    assert per_row["image"] < (tmp_path / receipts[0]["image"]).stat().st_size / 10


def test_a_local_model_is_refused_at_submit_naming_the_attachment(tmp_path, env, receipts):
    data, pipeline_path = write_dataset(tmp_path, receipts, pipeline("image", "image"))
    refused = promptmill("submit", str(data), "--pipeline", str(pipeline_path), "--backend", "vllm",
                         "--model", "smollm2-135m-instruct", "--out", str(tmp_path / "out"), env=env)  # fmt: skip
    assert refused.returncode == 2
    assert "attachments: 'image' (image)" in refused.stderr and "text only" in refused.stderr


@pytest.mark.parametrize("backend", ["anthropic-batch", "openai-batch"])
def test_batch_requests_carry_the_files_as_the_real_time_api_takes_them(tmp_path, env, fake_api, receipts, backend):
    fake_api.configure(batch_delay_s=0.5)
    model = "claude-haiku-4-5" if backend == "anthropic-batch" else "gpt-4.1-mini"
    data, pipeline_path = write_dataset(tmp_path, receipts, pipeline("image", "image", model=model))
    batch_env = openai_env(env) | {"PROMPTMILL_BATCH_GATHER_S": "0.5", "PROMPTMILL_BATCH_POLL_MIN_S": "0.3",
                                   "PROMPTMILL_BATCH_POLL_MAX_S": "0.6", "PROMPTMILL_BATCH_HOLD_S": "3"}  # fmt: skip
    if backend == "anthropic-batch":
        batch_env |= {"ANTHROPIC_BASE_URL": env["ANTHROPIC_BASE_URL"], "ANTHROPIC_API_KEY": env["ANTHROPIC_API_KEY"]}
    run(batch_env, data, pipeline_path, tmp_path / "out", "--backend", backend)
    records = read_jsonl(tmp_path / "out" / "results.jsonl")
    assert [r["output"] for r in records] == [row["expected"] for row in receipts]
    log = answered(fake_api.log())
    assert {entry["files"][0]["sha256"] for entry in log} == {sha256(tmp_path / row["image"]) for row in receipts}


@pytest.mark.usefixtures("api_env")
def test_from_python_a_dataframes_relative_paths_are_the_callers_and_records_carry_the_hashes(
    tmp_path, fake_api, receipts, monkeypatch
):
    import pandas as pd

    import promptmill as pm

    monkeypatch.chdir(tmp_path)  # the frame's paths are relative to the notebook's folder
    frame = pd.DataFrame([{"id": row["id"], "image": row["image"], "answer": row["answer"]} for row in receipts])
    reader = pm.Pipeline(prompt="Receipt {id} [[reply:{answer}]]", output={"type": "object", "required": ["total"]},
                         model="claude-haiku-4-5", max_tokens=100, attachments=[{"column": "image", "kind": "image"}])  # fmt: skip
    results = pm.run(frame, reader, out=tmp_path / "out", workers=1, progress=False)
    table = results.to_pandas()
    assert list(table["status"]) == ["ok"] * 4, list(table["error"])
    outputs = [json.loads(output) if isinstance(output, str) else output for output in table["output"]]
    assert [output["total"] for output in outputs] == [row["expected"]["total"] for row in receipts]
    assert {entry["files"][0]["sha256"] for entry in answered(fake_api.log())} == {sha256(tmp_path / row["image"]) for row in receipts}


def test_vllms_own_media_loader_reads_the_image_parts_we_send_as_the_files_pixels(tmp_path, receipts):
    """No model that reads images can be built from a package here, so the local engine refuses
    attachments (above). What a vLLM server does with an `openai` job's image parts is checked on its
    own: vLLM's media connector (what its chat endpoint runs on `image_url`) decodes them to the
    file's pixels, a resized one to its best size."""
    from vllm.multimodal.utils import MediaConnector

    from promptmill.pipelines.attachments import describe, limits_for, load, openai_content
    from promptmill.pipelines.items import AttachmentRef

    big = noise_png(tmp_path / "big.png", 1400)
    for path, resize, size in ((tmp_path / receipts[1]["image"], False, None), (big, True, (1072, 1072))):
        ref = describe(AttachmentRef(column="image", kind="image", source=str(path)), None, limits_for("openai"), resize)
        (part,) = openai_content("", [load(ref, "", 0, limits_for("anthropic"), resize)])
        decoded = MediaConnector().fetch_image(part["image_url"]["url"])
        with Image.open(path) as original:
            if size is None:
                assert decoded.size == original.size and decoded.tobytes() == original.convert("RGB").tobytes()
            else:
                assert decoded.size == size


def test_a_file_pillow_cannot_read_or_a_decompression_bomb_fails_its_row_never_the_worker(tmp_path):
    """Whatever Pillow says of a row's image (not an image, cut short, more pixels than an image may
    have, read from its header before anything is decoded) is that row's `AttachmentError`, at submit
    (`describe`) and in the worker that shrinks it (`load` with resize), never an exception that
    stops a chunk or a job."""
    from promptmill.pipelines.attachments import MAX_IMAGE_PIXELS, AttachmentError, describe, limits_for, load
    from promptmill.pipelines.items import AttachmentRef

    bomb = tmp_path / "bomb.png"
    Image.new("1", (8_000, 8_000)).save(bomb)  # 64 megapixels in a few KB
    assert bomb.stat().st_size < 100_000 and 8_000 * 8_000 > MAX_IMAGE_PIXELS
    huge = tmp_path / "huge.png"
    Image.new("1", (10_000, 10_000)).save(huge)  # past Pillow's own bound too: its DecompressionBomb refusal
    text = tmp_path / "notes.png"
    text.write_text("a text file, named as an image\n")
    cut = tmp_path / "cut.png"
    noise_png(tmp_path / "whole.png", 300)
    cut.write_bytes((tmp_path / "whole.png").read_bytes()[:2000])
    limits = limits_for("anthropic")
    for path, said in ((bomb, "megapixels"), (huge, "decompression bomb"), (text, "unknown type"), (cut, "not a readable image")):
        ref = AttachmentRef(column="image", kind="image", source=str(path))
        with pytest.raises(AttachmentError, match=said):
            describe(ref, None, limits, resize=True)
        if path is cut:
            continue  # at its best size already: the worker sends its bytes as hashed, undecoded
        # The worker's side, for a file that changed into this after a good one was hashed at submit
        # (its sha256 recorded as this file's own here, so the bytes reach Pillow as it resizes).
        hashed = ref.model_copy(update={"sha256": sha256(path), "media_type": "image/png"})
        with pytest.raises(AttachmentError, match=said if path is not text else "not a readable image"):
            load(hashed, "", 1, limits, resize=True)


def test_a_compares_contenders_read_the_rows_files_where_the_input_names_them(tmp_path, env, fake_api, receipts):
    """A compare's contenders read a sample copied into the compare's folder: the rows' relative paths
    still lead to the files beside the input (the job's folder for them is the input's)."""
    rows = [{k: v for k, v in row.items() if k != "pdf"} for row in receipts]
    data, pipeline_path = write_dataset(tmp_path, rows, pipeline("image", "image"))
    result = promptmill("compare", str(data), "--pipeline", str(pipeline_path), "--against", "anthropic:claude-haiku-4-5",
                        "--sample", "4", "--out", str(tmp_path / "cmp"), "--json", env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr
    (contender,) = json.loads(result.stdout)["contenders"]
    assert contender["ok"] == 4, contender
    sent = {entry["files"][0]["sha256"] for entry in answered(fake_api.log())}
    assert sent == {sha256(tmp_path / row["image"]) for row in receipts}
