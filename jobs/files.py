"""Files that are whole or absent: written beside their name, synced, renamed into place, and the
folder synced, so a crash leaves the old file or the new one, never half of one or a `.partial`.
And private: what promptmill writes (data folder, job folders, staged inputs, results, shards, logs)
is its user's alone, folders 0700 and files 0600, whatever the umask it was started with."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import IO, Any, Iterator


PRIVATE_UMASK = 0o077  #: group and others get no bit of what promptmill makes


def make_private() -> int:
    """From now on this process (and every process it starts) makes its folders 0700 and files 0600:
    the umask only takes bits away, so the one it had is kept, with group's and others' bits added.
    Returns the umask it had."""
    before = os.umask(PRIVATE_UMASK)
    os.umask(before | PRIVATE_UMASK)
    return before


@contextlib.contextmanager
def private_files() -> Iterator[None]:
    """`make_private` while the block runs (the Python API's calls, in a caller's process whose own
    files are none of ours), then the caller's umask again. Also a decorator: `@private_files()`."""
    before = make_private()
    try:
        yield
    finally:
        os.umask(before)


def sync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable: without it a power loss may undo the rename."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: Path, mode: str = "wb", **options: Any) -> Iterator[IO[Any]]:
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    try:
        with partial.open(mode, **options) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    sync_folder(path.parent)
