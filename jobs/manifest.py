"""`OUT/manifest.json`: what produced a job's results, for an audit: the tool's version, the backend
and models, the pipeline's text and hash, the input's path and hash, limits, times and worker hosts."""

from __future__ import annotations

import hashlib
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import orjson

from promptmill.config.prices import BATCH, LONG
from promptmill.jobs.files import atomic_write
from promptmill.jobs.spec import JobSpec
from promptmill.jobs.state.status import JobState
from promptmill.jobs.state.store import JobStore
from promptmill.pipelines.items import iso_utc


def _version() -> str:
    try:
        return version("promptmill")
    except PackageNotFoundError:
        return "unknown"


def write_manifest(store: JobStore, spec: JobSpec, out_dir: Path) -> Path:
    status = store.status(spec.job_id)
    pipeline_text = spec.pipeline_text or ""
    manifest = {
        "promptmill_version": _version(),
        "job_id": spec.job_id,
        "backend": spec.backend,
        # The ledger names a model's requests at long-context rates MODEL@long: one model all the same.
        "models": sorted({name.removesuffix(BATCH).removesuffix(LONG) for name in status.requests_by_model} | {spec.model}),
        "pipeline": {
            "path": spec.pipeline_path,
            "text": pipeline_text,
            "sha256": hashlib.sha256(pipeline_text.encode()).hexdigest(),
        },
        "input": {"path": spec.input_path, "format": spec.input_format, "sha256": status.input_sha256},
        "limits": spec.limits.model_dump(),
        "chunk_size": spec.chunk_size,
        "started_at": iso_utc(status.created_at),
        # A job that completes as it is exported has its end recorded right after: it ended by now.
        "finished_at": iso_utc(status.finished_at or (time.time() if status.state is JobState.complete else None)),
        "state": status.state.value,
        "rows": {"total": status.total, "ok": status.ok, "failed": status.failed},
        "worker_hosts": store.hosts(spec.job_id),
    }
    path = out_dir / "manifest.json"
    with atomic_write(path) as handle:
        handle.write(orjson.dumps(manifest, option=orjson.OPT_INDENT_2))
    return path
