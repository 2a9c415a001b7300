"""The job page's actions, each a POST the guard has checked (token and CSRF), each the Python API's
own: cancel, pause, a new budget; a resume runs `promptmill resume JOB` in the background here (its
local workers, its log in the job's logs folder), as the command would in a terminal."""

from __future__ import annotations

import os
import subprocess
import threading
from pathlib import Path

from starlette.exceptions import HTTPException
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from promptmill.api.jobs import Job, JobError
from promptmill.jobs.state.status import JobState
from promptmill.web.pages import spec_of, viewer_of
from promptmill.workers.local_workers import promptmill_command


def _back(job_id: str, said: str) -> Response:
    response = RedirectResponse(f"/jobs/{job_id}", status_code=303)
    response.set_cookie("promptmill_ui_said", said.replace('"', "'")[:300], max_age=30, samesite="strict", path="/")
    return response


class ResumeRunning(RuntimeError):
    """A resume this viewer started for the job is still running."""


_resumes: dict[str, subprocess.Popen] = {}  # job id -> the resume this viewer started for it
_resumes_lock = threading.Lock()


def resume_in_background(job_id: str, out_dir: str, retry_failed: bool = False, budget: float | None = None) -> Path:
    """`promptmill resume JOB` in a process of its own (it outlives the viewer), by the installed
    command (never `python -m` from the viewer's folder, whose files would come first on its import
    path); returns its log. A second while the first still runs raises ResumeRunning."""
    logs = Path(out_dir) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"{job_id}.ui-resume.log"
    command = [*promptmill_command(), "resume", job_id]
    command += ["--retry-failed"] if retry_failed else []
    command += ["--budget", str(budget)] if budget is not None else []
    with _resumes_lock:
        running = _resumes.get(job_id)
        if running is not None and running.poll() is None:
            raise ResumeRunning(f"a resume of job {job_id} started here is still running (pid {running.pid}); its log: {log}")
        with log.open("ab") as written:
            _resumes[job_id] = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=written, stderr=subprocess.STDOUT,
                                                start_new_session=True, env=os.environ.copy())  # fmt: skip
    return log


async def act(request: Request) -> Response:
    form = await request.form()
    # What an action does (Redis, a process started) runs in a worker thread, as every page does.
    return await run_in_threadpool(_act, request, str(form.get("usd", "")))


def _act(request: Request, usd: str) -> Response:
    spec = spec_of(request)
    action = request.path_params["action"]
    if action not in ACTIONS:
        raise HTTPException(404, f"no action {action}")
    job = Job(spec.job_id)
    state = viewer_of(request).store.status(spec.job_id).state
    if action == "cancel":
        job.cancel()
        return _back(spec.job_id, f"job {spec.job_id} cancelled: its workers finish the rows in flight")
    if action == "pause":
        paused = job.pause()
        return _back(spec.job_id, "paused" if paused else f"not paused: the job is {state.value}")
    budget: float | None = None
    if action == "budget":
        try:
            budget = float(usd)
            job.set_budget(budget)
        except (ValueError, JobError):
            return _back(spec.job_id, "budget: give an amount in USD, 0 or more")
        if state is not JobState.paused_budget:
            return _back(spec.job_id, f"budget set to ${budget:,.2f}")
    if state.runnable:
        return _back(spec.job_id, f"the job is {state.value}: nothing to resume")
    try:
        log = resume_in_background(spec.job_id, spec.out_dir, retry_failed=action == "retry-failed", budget=budget)
    except ResumeRunning as running:
        return _back(spec.job_id, f"not resumed: {running}")
    return _back(spec.job_id, f"resuming here (promptmill resume); its log: {log}")


ACTIONS = ("cancel", "pause", "resume", "retry-failed", "budget")
