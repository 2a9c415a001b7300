"""Where a row's file may come from: the data's own folder, and what the workers' operator allows
beside it. A downloaded dataset may name the worker's secrets every way it can (a symlink shipped with
the data, `../`, `file://`, `~`, an absolute path, a link-local URL); none of them is read or sent.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from promptmill.pipelines.attachments import INPUT_SOURCE, REMOTE, AttachmentError
from promptmill.pipelines.items import AttachmentRef

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def _entries(listed: str) -> list[str]:
    return [entry.strip() for entry in listed.split(",") if entry.strip()]


def _bucket(url: str) -> str:
    """A cloud URL's bucket, as `s3://name` or `gs://name` (gcs:// is gs://)."""
    parts = urlparse(url)
    return f"{'gs' if parts.scheme == 'gcs' else parts.scheme}://{parts.netloc}"


@dataclass(frozen=True)
class Access:
    """Where a job's rows may take their files from: the data's own folder (symlinks followed, then
    checked), and what the workers' operator allows beside it (`PROMPTMILL_ATTACHMENT_ROOTS`: folders
    and cloud buckets; `PROMPTMILL_ATTACHMENT_URL_HOSTS`: the https hosts a self-hosted server may be
    sent to fetch). The producer checks each row's value (`source`); the worker checks the recorded
    reference again (`check`), whatever a spec in Redis says."""

    folder: Path  #: the data's folder: a relative path is inside it or refused
    roots: tuple[Path, ...] = ()
    buckets: tuple[str, ...] = ()  #: "s3://bucket", "gs://bucket"
    url_hosts: tuple[str, ...] | None = None  #: None: the provider fetches an https URL itself, any host

    @classmethod
    def of(cls, folder: str | Path, settings: Any, self_hosted: bool) -> "Access":
        """The job's rule under these settings: made once per job and settings in a process (a row is
        rendered, and a request checked, with it: its folders are not resolved again for each)."""
        return _access(str(folder), settings.attachment_roots, settings.attachment_url_hosts, self_hosted)

    def source(self, value: Any, column: str) -> str:
        """Where a row's attachment is, from its column's value: a real path (symlinks resolved)
        inside the data's folder or an allowed root, an allowed URL as it is, or INPUT_SOURCE for
        bytes held in the row itself. Anything else raises AttachmentError naming the value."""
        if isinstance(value, (bytes, bytearray, memoryview)):
            return INPUT_SOURCE
        if not isinstance(value, str) or not value.strip():
            raise AttachmentError(f"attachment {column!r}: expected a path, a URL or bytes, not {value!r:.100}")
        value = value.strip()
        if _SCHEME.match(value) and not value.startswith("file://"):
            return self._url(value, column)
        if value.startswith("file://"):
            path = Path(unquote(urlparse(value).path))
        else:
            path = Path(value).expanduser() if value.startswith("~") else Path(value)
        if path.is_absolute():  # the data names a place of its own: only where the operator allows
            real = path.resolve()
            if not any(real.is_relative_to(root) for root in self.roots):
                raise AttachmentError(
                    f"attachment {column!r}: {value} is outside the data's folder; a file named by an absolute "
                    f"path, file:// or ~ must be under a folder of PROMPTMILL_ATTACHMENT_ROOTS"
                )
            return str(real)
        real = (self.folder / path).resolve()
        if not self._allowed(real):
            raise AttachmentError(
                f"attachment {column!r}: {value} leads outside the data's folder {self.folder} (to {real}); "
                f"allow its folder in PROMPTMILL_ATTACHMENT_ROOTS if it is meant"
            )
        return str(real)

    def check(self, ref: AttachmentRef) -> None:
        """The worker's check of a recorded reference: the same rule, and a local file's sha256."""
        source = ref.source
        if _SCHEME.match(source) and not source.startswith("file://"):
            self._url(source, ref.column)
            return
        path = Path(unquote(urlparse(source).path)) if source.startswith("file://") else Path(source)
        if source != INPUT_SOURCE and (not path.is_absolute() or not self._allowed(path.resolve())):
            raise AttachmentError(f"attachment {ref.column!r}: {source} is outside the data's folder and the "
                                  f"folders this worker allows (PROMPTMILL_ATTACHMENT_ROOTS)")  # fmt: skip
        if ref.sha256 is None:
            raise AttachmentError(f"attachment {ref.column!r}: {source} was not hashed at submit; a worker "
                                  f"sends a file's bytes only with their sha256")  # fmt: skip

    def _allowed(self, real: Path) -> bool:
        return any(real.is_relative_to(folder) for folder in (self.folder, *self.roots))

    def _url(self, url: str, column: str) -> str:
        parts = urlparse(url)
        if url.startswith(REMOTE):
            bucket = _bucket(url)
            if bucket not in self.buckets:
                raise AttachmentError(f"attachment {column!r}: {url}: the bucket {bucket} is not one of "
                                      f"PROMPTMILL_ATTACHMENT_ROOTS")  # fmt: skip
            return url
        if parts.scheme != "https":
            raise AttachmentError(f"attachment {column!r}: {url}: only https:// URLs go out (the provider "
                                  f"fetches them); give a file in the data's folder instead")  # fmt: skip
        host = (parts.hostname or "").lower()
        if self.url_hosts is not None and host not in self.url_hosts:
            raise AttachmentError(f"attachment {column!r}: {url}: a self-hosted server would fetch it from inside "
                                  f"your network; allow {host} in PROMPTMILL_ATTACHMENT_URL_HOSTS if it is meant")  # fmt: skip
        return url


@functools.lru_cache(maxsize=256)
def _access(folder: str, listed_roots: str, listed_hosts: str, self_hosted: bool) -> Access:
    roots, buckets = [], []
    for entry in _entries(listed_roots):
        if entry.startswith(REMOTE):
            buckets.append(_bucket(entry))
        else:
            roots.append(Path(entry).expanduser().resolve())
    hosts = tuple(entry.lower() for entry in _entries(listed_hosts)) if self_hosted else None
    return Access(Path(folder).resolve(), tuple(roots), tuple(buckets), hosts)
