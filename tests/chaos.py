"""The chaos tests' harness, in one place: finding a run's workers, killing them at random or by what
they hold, and watching a job for stalls. The tests keep only what they assert."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from dataclasses import dataclass

import psutil

from promptmill.jobs.state.keys import JobKeys
from promptmill.jobs.state.store import JobStore


def running(pid: int) -> bool:
    """Is the process alive (a killed child waiting to be reaped is not)?"""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _is_live_worker(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE and "worker" in " ".join(process.cmdline())
    except psutil.Error:
        return False


def live_workers(run: subprocess.Popen) -> list[psutil.Process]:
    """The local workers a `run` started that are alive now."""
    return [child for child in psutil.Process(run.pid).children() if _is_live_worker(child)]


def kill_tree(process: subprocess.Popen) -> None:
    """Kill a command that is still running, and the workers it started."""
    if process.poll() is not None:
        return
    for child in psutil.Process(process.pid).children(recursive=True):
        child.kill()
    process.kill()


@dataclass(frozen=True)
class Kill:
    at: float  # monotonic
    ports: frozenset[int]  # the connections it was talking on: which answers it may have left unread


def kill_workers_at_random(run: subprocess.Popen, rng: random.Random, every_s: tuple[float, float]) -> list[Kill]:
    """Until the run ends: every `every_s` (drawn), SIGKILL one of its workers, frozen first so that it
    opens no connection between the look at its ports and its death."""
    kills: list[Kill] = []
    while run.poll() is None:
        time.sleep(rng.uniform(*every_s))
        workers = live_workers(run)
        if run.poll() is None and workers:
            victim = rng.choice(workers)
            try:
                victim.send_signal(signal.SIGSTOP)
                ports = frozenset(connection.laddr.port for connection in victim.net_connections(kind="tcp"))
                victim.send_signal(signal.SIGKILL)
            except psutil.Error:
                continue
            kills.append(Kill(time.monotonic(), ports))
    return kills


def kill_holders_of_resent_chunks(store: JobStore, job_id: str, run: subprocess.Popen, count: int, within_s: float) -> int:
    """SIGKILL the worker running a chunk the sweeper sent again, `count` times; returns how many."""
    killed, deadline = 0, time.monotonic() + within_s
    while killed < count and time.monotonic() < deadline and run.poll() is None:
        for chunk in store.redis.hkeys(JobKeys(job_id).resent):
            token = store.redis.get(JobKeys(job_id).lease(chunk.decode()))
            # A lease a killed worker still holds until it runs out names a process that is gone.
            holder = int(token.decode().split(":")[1]) if token is not None else None
            if holder is not None and running(holder):
                try:
                    os.kill(holder, signal.SIGKILL)
                except ProcessLookupError:
                    continue  # it died between the two calls
                killed += 1
                break
        time.sleep(0.02)
    return killed


def longest_stall_s(store: JobStore, job_id: str, run: subprocess.Popen, within_s: float) -> float:
    """Watch the job until its run ends: the longest time no row was committed."""
    longest, progress_at, done = 0.0, time.monotonic(), store.status(job_id).terminal
    deadline = time.monotonic() + within_s
    while run.poll() is None:
        time.sleep(0.2)
        now_done = store.status(job_id).terminal
        if now_done != done:
            done, progress_at = now_done, time.monotonic()
        longest = max(longest, time.monotonic() - progress_at)
        assert time.monotonic() < deadline, "the job did not end"
    return longest
