"""`promptmill report` for an API job, through the real CLI, workers and the local server."""

from __future__ import annotations

import redis

from promptmill.jobs.state.pace import job_pace
from tests.conftest import API_KEY, promptmill
from tests.support import write_dataset
from tests.test_api_jobs import job_id_of

PIPELINE = """
name = "report"
model = "claude-haiku-4-5"
prompt = "Item {id}: {text}"
max_tokens = 8
"""


def test_a_report_tells_an_api_jobs_story_offline(tmp_path, env, fake_api):
    fake_api.configure(latency_ms=20, p429=0.05, retry_after=0.05)
    rows = ({"id": i, "text": f"row {i}" + (" [[status:400]]" if i % 50 == 7 else "")} for i in range(300))
    data, pipeline = write_dataset(tmp_path, rows, PIPELINE)
    result = promptmill("run", str(data), "-p", str(pipeline), "--out", str(tmp_path / "out"), env=env)
    assert result.returncode == 0, result.stderr
    job_id = job_id_of(result)

    reported = promptmill("report", job_id, env=env)
    assert reported.returncode == 0, reported.stderr
    page = (tmp_path / "out" / "report.html").read_text()
    assert reported.stdout.strip() == str(tmp_path / "out" / "report.html")
    # Rows over time, pace against the limit, latency, tokens and cost by model, failures by kind.
    # Plotly's script is one shared file beside the page, not 4.6 MB inside it: it still opens offline.
    assert page.count("Plotly.newPlot") == 5 and page.count('<script charset="utf-8" src=') == 1
    bundle = page.split('<script charset="utf-8" src="')[1].split('"')[0]
    assert bundle.startswith("plotly-") and (tmp_path / "out" / bundle).stat().st_size > 1_000_000
    assert len(page) < 300_000
    assert "<h2>Answers</h2>" in page and "<h3>The first 20 rows</h3>" in page
    assert f"<td>{job_id}</td>" in page and "<td>300</td><td>294</td><td>6</td>" in page
    assert "<td>invalid_request</td><td>7</td><td>400 invalid_request_error: prompt is poisoned" in page
    assert "answers were 429" in page and "<td>ok</td></tr></table>" in page  # verify's verdict
    assert API_KEY not in page
    # The request pace it plots is the server's: every request sent, every 429 marked in its slot.
    assert "Requests per second against the limit in force" in page
    slots = job_pace(redis.Redis.from_url(env["PROMPTMILL_REDIS_URL"]), job_id, 0).requests_over_time
    log = [e for e in fake_api.log() if e["prompt"] is not None]
    assert sum(slot[1] for slot in slots) == len(log)
    assert sum(slot[2] for slot in slots) == sum(1 for e in log if e["status"] == 429) > 0
    assert all(slot[5] == 100_000 for slot in slots[1:])  # the limit the server's headers named


def test_old_pace_slots_roll_up_into_coarser_ones_keeping_every_count(redis_url):
    """Two days of 10-second slots: after the roll-up the hash holds a bounded number of fields, and
    the job's totals, its curve's end and its last minute's rate are what they were."""
    import time

    from promptmill.jobs.state.keys import JobKeys
    from promptmill.jobs.state.pace import SLOT_S, roll_up

    client = redis.Redis.from_url(redis_url)
    job_id = f"pace-{time.time_ns()}"
    now = 1_800_000_000.0
    first_slot = int(now - 2 * 86_400) // SLOT_S
    with client.pipeline(transaction=False) as pipe:
        for slot in range(first_slot, int(now) // SLOT_S + 1):
            pipe.hset(JobKeys(job_id).pace, mapping={f"{slot}|rows": 3, f"{slot}|requests": 4, f"{slot}|r429": slot % 2,
                                                     f"{slot}|rpm": 600 + slot % 7})  # fmt: skip
        pipe.hset(JobKeys(job_id).pace, mapping={"first": first_slot * SLOT_S, "last": now})
        pipe.execute()
    before = job_pace(client, job_id, 100, now=now)
    fields_before = client.hlen(JobKeys(job_id).pace)

    assert roll_up(client, job_id, now=now) > 0
    assert roll_up(client, job_id, now=now + 30) == 0  # at most once a minute
    after = job_pace(client, job_id, 100, now=now)
    fields = client.hlen(JobKeys(job_id).pace)
    # An hour of 10-second slots, a day of 10-minute ones, hours before: about 360 + 138 + 24 slots of
    # 4 fields (a slot more at each edge), against 17,281 slots before.
    assert fields_before > 60_000 and fields <= (361 + 139 + 25) * 4 + 3
    assert after.rows_over_time[-1][1] == before.rows_over_time[-1][1]
    assert [sum(slot[i] for slot in after.requests_over_time) for i in (1, 2)] == [
        sum(slot[i] for slot in before.requests_over_time) for i in (1, 2)
    ]
    assert after.rows_per_s == before.rows_per_s and after.eta_s == before.eta_s
    assert max(s[5] for s in after.requests_over_time) == max(s[5] for s in before.requests_over_time)
    assert {slot[6] for slot in after.requests_over_time} == {SLOT_S, 600, 3_600}
    client.delete(JobKeys(job_id).pace)
