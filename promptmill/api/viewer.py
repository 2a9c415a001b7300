"""`pm.ui()`: the live viewer (`promptmill ui`) served from a thread of this process, for a notebook."""

from __future__ import annotations

from typing import Any

DEFAULT_PORT = 8686


def ui(port: int = DEFAULT_PORT, host: str = "127.0.0.1") -> Any:
    """Serve the live viewer of the jobs in this Redis (configured or embedded) and return it at once:
    open its `url` (it carries the token every request needs); `stop()` ends it. Port 0: any free one.

    >>> viewer = pm.ui()          # doctest: +SKIP
    >>> viewer.url                # doctest: +SKIP
    'http://127.0.0.1:8686/?token=...'
    """
    from promptmill.web.server import Viewer

    return Viewer(host, port).start()
