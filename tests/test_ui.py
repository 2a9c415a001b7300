"""`promptmill ui` in a real browser (Debian's Chromium, driven by Playwright): the jobs page follows a
running job, a job's failed rows open, a cancel from the page stops the job, every value shown is
escaped, and nothing answers without the token."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.support import promptmill, promptmill_process, read_jsonl, start_cli, stop, wait_until, write_dataset

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed (.ci/run installs it)")

EVIL = "<script>window.__pwned = 1</script><img src=x onerror=\"window.__pwned = 2\">"
PIPELINE = """
name = "ui <script>window.__pwned = 3</script>"
model = "claude-haiku-4-5"
system = "Answer in one word. <b>bold?</b>"
prompt = "Review: {text}"
max_tokens = 20
"""
SHOTS = os.environ.get("PROMPTMILL_UI_SHOTS")  # where the README's screenshots are taken from


def _rows(count: int) -> list[dict]:
    """Rows the fake API answers; every fifth fails for good (400), every seventh answers with markup,
    row 11 fails with a server error whose message is markup."""
    rows = []
    for i in range(count):
        text = f"review {i}"
        if i == 11:
            text += " [[status:500]]"
        elif i % 5 == 3:
            text += " [[status:400]]"
        elif i % 7 == 2:
            text += f" [[reply:{EVIL}]] {EVIL}"
        rows.append({"text": text})
    return rows


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield launched
        launched.close()


@pytest.fixture
def viewer(env):
    """`promptmill ui` on a free port; its URL as it printed it."""
    process = start_cli(env, "ui", "--port", "0")
    line = process.stdout.readline()
    match = re.search(r"(http://127\.0\.0\.1:\d+)/\?token=(\S+)", line)
    assert match, f"no URL in {line!r}: {process.stderr.read() if process.poll() is not None else ''}"
    yield {"base": match.group(1), "token": match.group(2), "url": match.group(0)}
    stop(process)


def _page(browser):
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page.on("dialog", lambda dialog: dialog.accept())  # every action's confirmation: yes
    return page


def _shot(page, name: str, tmp_path: Path) -> None:
    page.screenshot(path=str(tmp_path / f"{name}.png"), full_page=True)
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(SHOTS) / f"{name}.png"), full_page=False)


def _start_job(env, tmp_path: Path, rows: int, rpm: int) -> tuple:
    data, pipeline = write_dataset(tmp_path / "in", _rows(rows), PIPELINE)
    run = start_cli(env, "run", str(data), "-p", str(pipeline), "--rpm", str(rpm), "--workers", "1",
                    "--out", str(tmp_path / "out"), "--json", "--max-failed-share", "1")  # fmt: skip
    job_id = {}

    def started() -> bool:
        folder = tmp_path / "out" / "shards" / ".job"
        if folder.exists() and folder.read_text().split():
            job_id["id"] = folder.read_text().split()[0]
        return "id" in job_id

    wait_until(started, 120, "the job to start")
    return run, job_id["id"]


def _done(page, job_id: str) -> int:
    return int(page.locator(f"tr[data-job='{job_id}'] td.done").inner_text().replace(",", ""))


def test_the_jobs_page_follows_a_running_job_then_its_failed_rows_open(browser, viewer, env, fake_api, tmp_path):
    fake_api.configure(latency_ms=50, error_message=EVIL)
    run, job_id = _start_job(env, tmp_path, rows=40, rpm=150)
    try:
        page = _page(browser)
        page.goto(viewer["url"])
        row = page.locator(f"tr[data-job='{job_id}']")
        row.wait_for(timeout=30_000)
        first = _done(page, job_id)
        # The page reads the job again by itself: its count of rows done goes up without a reload.
        page.wait_for_function(
            f"() => {{ const c = document.querySelector(\"tr[data-job='{job_id}'] td.done\");"
            f" return c && Number(c.innerText.replace(/,/g, '')) > {first}; }}", timeout=60_000,
        )  # fmt: skip
        assert _done(page, job_id) > first
        _shot(page, "ui-jobs", tmp_path)
        finished = run.communicate(timeout=240)
        assert run.returncode == 0, finished
        page.wait_for_function(f"() => document.querySelector(\"tr[data-job='{job_id}'] .state\").innerText === 'complete'",
                               timeout=30_000)  # fmt: skip

        page.click(f"tr[data-job='{job_id}'] a")
        page.wait_for_selector("#live .state.complete")
        page.wait_for_selector(".plot .main-svg", timeout=60_000)  # the report's plots, drawn from data
        assert "verify: ok" in page.locator(".verdict").inner_text()
        _shot(page, "ui-job", tmp_path)

        page.get_by_role("link", name="Rows", exact=True).click()
        page.select_option("select[name=status]", "failed")
        page.click("button:has-text('Show')")
        page.wait_for_url(re.compile(r"status=failed"))
        shown = page.locator("table.rows tbody tr")
        failed = [r for r in _rows(40) if "[[status:" in r["text"]]
        assert page.locator("table.rows .state").all_inner_texts() == ["failed"] * len(failed)
        assert shown.count() == len(failed)
        _shot(page, "ui-rows", tmp_path)
        shown.first.locator("a").click()
        page.wait_for_selector("h2:has-text('Error')")
        assert "invalid_request" in page.locator("p.bad").inner_text()
        assert "Review: review 3 [[status:400]]" in page.locator("pre.prompt").last.inner_text()

        # The other filters, the search and a sort, as the rows page's URL asks them.
        results = read_jsonl(tmp_path / "out" / "results.jsonl")

        def rows_shown(query: str) -> list[int]:
            page.goto(f"{viewer['base']}/jobs/{job_id}/rows?{query}")
            return [int(number) for number in page.locator("table.rows tbody td.n a").all_inner_texts()]

        assert rows_shown("kind=server_error") == [11]
        assert rows_shown("kind=invalid_request") == [i for i, row in enumerate(_rows(40)) if "[[status:400]]" in row["text"]]
        assert rows_shown("attempts=2") == [11]  # retried; every other row went once
        assert rows_shown("q=PWNED") == sorted([11] + [i for i, row in enumerate(_rows(40)) if "reply:" in row["text"]])
        haiku = [r["row"] for r in results if r["model"] == "claude-haiku-4-5"]
        assert haiku and rows_shown("model=claude-haiku-4-5") == haiku and rows_shown("model=another") == []
        slowest_first = sorted(results, key=lambda r: (r["latency_ms"] is None, -(r["latency_ms"] or 0), r["row"]))
        assert rows_shown("sort=latency&order=desc") == [r["row"] for r in slowest_first]

        # Every value from rows, answers and pipelines is shown as text, never run.
        paths = ("/", f"/jobs/{job_id}", f"/jobs/{job_id}/rows?q=pwned", f"/jobs/{job_id}/rows?status=failed",
                 f"/jobs/{job_id}/rows/11", f"/jobs/{job_id}/rows/2")  # fmt: skip
        for path in paths:
            page.goto(viewer["base"] + path)
            page.wait_for_load_state("networkidle")
            assert page.evaluate("() => window.__pwned") is None, path
            if path.endswith("/11"):
                assert EVIL in page.locator(".error-message").inner_text()
                assert "server_error" in page.locator("p.bad").inner_text()
        assert EVIL in page.locator("pre.answer").inner_text()
        assert page.locator("img[src=x]").count() == 0
        assert [r["row"] for r in results if r["text"] == EVIL] == [i for i, row in enumerate(_rows(40)) if "reply:" in row["text"]]
    finally:
        stop(run)


def test_pause_resume_and_cancel_from_the_job_page_steer_the_job(browser, viewer, env, fake_api, tmp_path):
    fake_api.configure(latency_ms=50)
    run, job_id = _start_job(env, tmp_path, rows=400, rpm=120)
    resumed_log = tmp_path / "out" / "logs" / f"{job_id}.ui-resume.log"
    try:
        page = _page(browser)
        page.goto(f"{viewer['url']}".replace("/?", f"/jobs/{job_id}?"))
        page.wait_for_selector("#live .state.running", timeout=60_000)
        page.click("button[value=pause]")  # each confirmation is accepted
        page.wait_for_selector("#live .state.paused", timeout=30_000)
        out, _ = run.communicate(timeout=120)  # the run sees its job stop and ends
        assert json.loads(out)["state"] == "paused"
        paused = json.loads(_cli(env, "status", job_id, "--json"))
        paused_at = paused["done"] + paused["failed"]

        page.click("button[value=resume]")  # `promptmill resume JOB` here, in the background
        assert "resuming here" in page.locator(".said").inner_text()
        page.wait_for_selector("#live .state.running", timeout=60_000)
        page.wait_for_function(
            f"() => Number(document.querySelector('#live .done').innerText.replace(/,/g, '')) > {paused_at}",
            timeout=120_000,
        )  # fmt: skip

        page.click("button[value=cancel]")
        page.wait_for_selector("#live .state.cancelled", timeout=30_000)
        assert "cancelled" in page.locator(".said").inner_text()
        wait_until(lambda: "was cancelled" in resumed_log.read_text(), 120, "the resumed run to see its job stop")
        sent = len(fake_api.log())
        status = json.loads(_cli(env, "status", job_id, "--json"))
        assert status["state"] == "cancelled" and paused_at < status["done"] + status["failed"] < 400
        assert len(fake_api.log()) == sent  # nothing more went out
    finally:
        stop(run)


def test_a_compare_shows_its_contenders_and_the_rows_where_they_disagree(browser, viewer, env, fake_api, tmp_path):
    pipeline = PIPELINE.replace('max_tokens = 20', 'max_tokens = 5\n[output]\ntype = "choice"\nchoices = ["positive", "negative"]')
    rows = [{"text": "fine [[reply:positive]]", "label": "positive"},
            {"text": f"{EVIL} [[reply@claude-haiku-4-5:positive]] [[reply@claude-sonnet-4-5:negative]]", "label": "negative"},
            {"text": "bad [[reply:negative]]", "label": "negative"}]  # fmt: skip
    data, pipeline_path = write_dataset(tmp_path / "in", rows, pipeline)
    folder = tmp_path / "compare"
    _cli(env, "compare", str(data), "-p", str(pipeline_path), "-a", "anthropic:claude-haiku-4-5",
         "-a", "anthropic:claude-sonnet-4-5", "--label", "label", "--out", str(folder))  # fmt: skip
    page = _page(browser)
    page.goto(viewer["url"])
    page.click(f"a:has-text('{folder}')")
    page.wait_for_selector(".plot .main-svg", timeout=60_000)  # cost against accuracy, latencies
    assert page.locator("h2:has-text('disagree')").inner_text() == "Rows where they disagree (1)"
    split = page.locator("table.rows tbody tr").all_inner_texts()
    script = EVIL[: EVIL.index("<img")]  # as JSON, the input's quotes are escaped
    assert len(split) == 1 and script in split[0] and '"positive"' in split[0] and '"negative"' in split[0]
    assert "anthropic:claude-sonnet-4-5" in page.locator("table").first.inner_text()
    assert page.evaluate("() => window.__pwned") is None


def _cli(env, *args: str) -> str:
    finished = promptmill(*args, env=env)
    assert finished.returncode == 0, finished.stderr
    return finished.stdout


def _get(url: str, method: str = "GET", headers: dict | None = None, body: bytes | None = None) -> int:
    request = urllib.request.Request(url, method=method, headers=headers or {}, data=body)
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status
    except urllib.error.HTTPError as refused:
        return refused.code


def test_a_request_without_the_token_is_refused(viewer, env, fake_api, tmp_path):
    base, token = viewer["base"], viewer["token"]
    data, pipeline = write_dataset(tmp_path / "in", [{"text": "fine"}], PIPELINE)
    job_id = json.loads(_cli(env, "run", str(data), "-p", str(pipeline), "--json", "--out", str(tmp_path / "out")))["job_id"]
    for path in ("/", "/fragments/jobs", f"/jobs/{job_id}", f"/jobs/{job_id}/rows", "/static/app.js"):
        assert _get(base + path) == 403, path
        assert _get(base + path + "?token=" + token[:-1] + "x") == 403, path
        assert _get(base + path, headers={"Authorization": f"token {token}"}) == 200, path
    # An action needs its CSRF value from the page, on top of the token, and a POST.
    held = {"Authorization": f"token {token}", "Content-Type": "application/x-www-form-urlencoded"}
    assert _get(f"{base}/jobs/{job_id}/cancel", "POST", held, b"") == 403
    assert _get(f"{base}/jobs/{job_id}/cancel", "POST", held, b"csrf=" + token.encode()) == 403
    assert _get(f"{base}/jobs/{job_id}/cancel", headers={"Authorization": f"token {token}"}) == 405
    assert json.loads(_cli(env, "status", job_id, "--json"))["state"] == "complete"


def test_a_new_budget_from_the_page_or_the_cli_becomes_the_jobs_cap(browser, viewer, env, fake_api, tmp_path):
    data, pipeline = write_dataset(tmp_path / "in", [{"text": "fine"}], PIPELINE)
    job_id = json.loads(_cli(env, "run", str(data), "-p", str(pipeline), "--json", "--out", str(tmp_path / "out")))["job_id"]
    page = _page(browser)
    page.goto(viewer["url"].replace("/?", f"/jobs/{job_id}?"))
    page.fill("input[name=usd]", "0.25")
    page.click("button:has-text('Set budget')")  # the confirmation is accepted
    assert "budget set to $0.25" in page.locator(".said").inner_text()
    assert json.loads(_cli(env, "status", job_id, "--json"))["budget"]["cap_usd"] == 0.25
    _cli(env, "budget", job_id, "none")
    assert json.loads(_cli(env, "status", job_id, "--json"))["budget"]["cap_usd"] is None
    refused = promptmill("budget", job_id, "--", "-1", env=env)
    assert refused.returncode == 2 and "below 0" in refused.stderr
    assert json.loads(_cli(env, "status", job_id, "--json"))["budget"]["cap_usd"] is None


def _ask(base: str, path: str, method: str = "GET", headers: dict | None = None, body: bytes | None = None):
    """One request as sent (no redirect followed, no cookie kept): its status, headers and body."""
    import http.client
    from urllib.parse import urlsplit

    where = urlsplit(base)
    connection = http.client.HTTPConnection(where.hostname, where.port, timeout=30)
    try:
        connection.putrequest(method, path, skip_host="Host" in (headers or {}))
        for name, value in (headers or {}).items():
            connection.putheader(name, value)
        if body is not None:
            connection.putheader("Content-Length", str(len(body)))
        connection.endheaders(body)
        answer = connection.getresponse()
        return answer.status, answer.headers, answer.read().decode(errors="replace")
    finally:
        connection.close()


def _said(headers) -> str:
    from http.cookies import SimpleCookie
    from urllib.parse import unquote

    cookies = SimpleCookie()
    for value in headers.get_all("set-cookie") or []:
        cookies.load(value)
    return unquote(cookies["promptmill_ui_said"].value) if "promptmill_ui_said" in cookies else ""


def test_the_viewers_resume_runs_the_installed_command_never_code_from_its_folder_and_only_once(env, fake_api, tmp_path):
    """The viewer runs in a folder holding a `typer.py` (a download, a project of the user's): the
    resume it starts is the installed `promptmill`, which never imports it. A second resume while the
    first runs is refused: one process resumes the job."""
    from promptmill.web.guard import csrf_value

    folder = tmp_path / "where-the-viewer-runs"
    folder.mkdir()
    marker = tmp_path / "typer-ran"
    (folder / "typer.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\nraise SystemExit(9)\n")
    fake_api.configure(latency_ms=200)
    data, pipeline = write_dataset(tmp_path / "in", [{"text": f"fine {i}"} for i in range(40)], PIPELINE)
    out = tmp_path / "out"
    paused = promptmill("run", str(data), "-p", str(pipeline), "--budget", "0.0000001", "--out", str(out), "--json", env=env)
    assert paused.returncode == 3, paused.stderr
    job_id = json.loads(paused.stdout)["job_id"]
    viewer = promptmill_process("ui", "--port", "0", env=env, cwd=folder, stdout=subprocess.PIPE, text=True)
    try:
        match = re.search(r"(http://127\.0\.0\.1:(\d+))/\?token=(\S+)", viewer.stdout.readline())
        assert match
        base, port, token = match.group(1), match.group(2), match.group(3)
        held = {"Authorization": f"token {token}", "Content-Type": "application/x-www-form-urlencoded"}
        form = f"csrf={csrf_value(token)}".encode()
        _, first, _ = _ask(base, f"/jobs/{job_id}/budget", "POST", held, form + b"&usd=1")
        _, second, _ = _ask(base, f"/jobs/{job_id}/resume", "POST", held, form)
        assert "resuming here" in _said(first), _said(first)
        assert "not resumed" in _said(second) or "nothing to resume" in _said(second), _said(second)
        log = out / "logs" / f"{job_id}.ui-resume.log"
        wait_until(lambda: json.loads(_cli(env, "status", job_id, "--json"))["state"] == "complete", 180, "the resume to end")
        lines = lambda start: [line for line in log.read_text().splitlines() if line.startswith(start)]  # noqa: E731
        wait_until(lambda: lines("done "), 60, "the resume's last line")
        assert len(lines("resuming:")) == len(lines("done ")) == 1, log.read_text()  # one resume ran
        assert not marker.exists()

        # Its own address only: another Host (a rebound name) is refused; a redirect stays on this origin;
        # its cookie is named by the port it really has (--port 0 here).
        assert _ask(base, "/", headers={"Authorization": f"token {token}", "Host": f"evil.example:{port}"})[0] == 403
        assert _ask(base, "/", headers={"Authorization": f"token {token}", "Host": f"localhost:{port}"})[0] == 200
        status, headers, _ = _ask(base, f"//evil.example/?token={token}")
        assert status == 303 and headers["location"].startswith("/") and not headers["location"].startswith("//")
        assert headers["set-cookie"].startswith(f"promptmill_ui_{port}="), headers["set-cookie"]
    finally:
        stop(viewer)
