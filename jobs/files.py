"""Files that are whole or absent: written beside their name, synced, renamed into place, and the
folder synced, so a crash leaves the old file or the new one, never half of one or a `.partial`."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import IO, Any, Iterator


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
