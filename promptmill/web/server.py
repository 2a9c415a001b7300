"""The viewer's app and its server: `promptmill ui` serves it until Ctrl-C, `pm.ui()` in a thread of
the notebook's process until `stop()`. Both bind 127.0.0.1 unless told otherwise."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import ExitStack
from functools import cache
from pathlib import Path

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from promptmill.api.driving import open_store
from promptmill.config.settings import Settings, get_settings
from promptmill.web import pages
from promptmill.web.actions import act
from promptmill.web.guard import SECURITY_HEADERS, TokenGuard, new_token
from promptmill.web.state import ViewerState

DEFAULT_PORT = 8686
STATIC = Path(__file__).parent / "static"


@cache
def _plotly_js() -> bytes:
    from plotly.offline import get_plotlyjs

    return get_plotlyjs().encode()


async def plotly_js(request: Request) -> Response:
    """plotly's script, from the installed plotly package (never a CDN)."""
    return Response(_plotly_js(), media_type="text/javascript", headers={"Cache-Control": "max-age=86400"})


async def _refused(request: Request, exc: Exception) -> Response:
    code = getattr(exc, "status_code", 500)
    return PlainTextResponse(f"{code}: {getattr(exc, 'detail', exc)}", status_code=code, headers=SECURITY_HEADERS)


def create_app(state: ViewerState, port: int) -> Starlette:
    job = "/jobs/{job_id:str}"
    routes = [
        Route("/", pages.jobs_page),
        Route("/fragments/jobs", pages.jobs_fragment),
        Route(job, pages.job_page),
        Route(job + "/live", pages.job_fragment),
        Route(job + "/plots", pages.job_plots),
        Route(job + "/rows", pages.rows_page),
        Route(job + "/rows/{row:int}", pages.row_page),
        Route(job + "/{action:str}", act, methods=["POST"]),
        Route("/compares/{key:str}", pages.compare_page),
        Route("/static/plotly.min.js", plotly_js),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    app = Starlette(routes=routes, middleware=[Middleware(TokenGuard, token=state.token, cookie=f"promptmill_ui_{port}")],
                    exception_handlers={404: _refused, 405: _refused, 409: _refused})  # fmt: skip
    app.state.viewer = state
    return app


def _port_taken(host: str, port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return True
        return False


class Viewer:
    """A running viewer: its `url` (with the token), `stop()`."""

    def __init__(self, host: str = "127.0.0.1", port: int = DEFAULT_PORT, settings: Settings | None = None):
        import uvicorn

        if port and _port_taken(host, port):
            raise OSError(f"port {port} on {host} is in use: choose another with --port (0: any free one)")
        self._stack = ExitStack()
        settings = settings or get_settings()
        store, _ = self._stack.enter_context(open_store(settings))
        self.token = new_token()
        app = create_app(ViewerState(settings, store, self.token), port)
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False, lifespan="off")
        self._server = uvicorn.Server(config)
        self.host = host
        self.port = port

    @property
    def url(self) -> str:
        shown = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{shown}:{self.port}/?token={self.token}"

    def _bound_port(self) -> None:
        for server in getattr(self._server, "servers", []):
            for sock in server.sockets:
                self.port = sock.getsockname()[1]
                return

    def start(self) -> "Viewer":
        """Serve from a thread of this process; returns once it answers."""
        self._thread = threading.Thread(target=self._server.run, daemon=True, name="promptmill-ui")
        self._thread.start()
        while not self._server.started:
            if not self._thread.is_alive():
                self._stack.close()  # an embedded Redis it started stops too
                raise OSError(f"the viewer could not serve on {self.host}:{self.port}")
            time.sleep(0.05)
        self._bound_port()
        return self

    def wait(self) -> None:
        """Serve until Ctrl-C (or `stop()` from elsewhere), then stop."""
        try:
            while self._thread.is_alive():
                self._thread.join(timeout=0.5)
        except KeyboardInterrupt:
            pass
        finally:
            self.stop()

    def stop(self) -> None:
        self._server.should_exit = True
        if getattr(self, "_thread", None) is not None:
            self._thread.join(timeout=10)
        self._stack.close()

    def __repr__(self) -> str:
        return f"<promptmill viewer {self.url}>"
