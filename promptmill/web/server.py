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
from promptmill.web.guard import LOCAL_HOSTS, SECURITY_HEADERS, TokenGuard, new_token
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


def create_app(state: ViewerState, port: int, host: str = "127.0.0.1") -> Starlette:
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
    guard = Middleware(TokenGuard, token=state.token, cookie=f"promptmill_ui_{port}", hosts=_names(host))
    app = Starlette(routes=routes, middleware=[guard],
                    exception_handlers={404: _refused, 405: _refused, 409: _refused})  # fmt: skip
    app.state.viewer = state
    return app


def _names(host: str) -> frozenset[str]:
    """The names a request may give as its Host: the local ones, --host, and for a wildcard address
    (every interface) this machine's name and addresses."""
    names = {host.lower()}
    if host in ("0.0.0.0", "::", ""):
        try:
            name, aliases, addresses = socket.gethostbyname_ex(socket.gethostname())
            names |= {name.lower(), *(alias.lower() for alias in aliases), *addresses}
        except OSError:
            pass
    return LOCAL_HOSTS | names


class Viewer:
    """A running viewer: its `url` (with the token), `stop()`."""

    def __init__(self, host: str = "127.0.0.1", port: int = DEFAULT_PORT, settings: Settings | None = None):
        import uvicorn

        # Bound here, before the app is made: its cookie is named by the port it really has (0: any free one).
        self._socket = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._socket.bind((host, port))
        except OSError:
            self._socket.close()
            raise OSError(f"port {port} on {host} is in use: choose another with --port (0: any free one)") from None
        self.host = host
        self.port = self._socket.getsockname()[1]
        self._stack = ExitStack()
        self._stack.callback(self._socket.close)
        settings = settings or get_settings()
        store, _ = self._stack.enter_context(open_store(settings))
        self.token = new_token()
        app = create_app(ViewerState(settings, store, self.token), self.port, host)
        config = uvicorn.Config(app, host=host, port=self.port, log_level="warning", access_log=False, lifespan="off")
        self._server = uvicorn.Server(config)

    @property
    def url(self) -> str:
        shown = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{shown}:{self.port}/?token={self.token}"

    def start(self) -> "Viewer":
        """Serve from a thread of this process; returns once it answers."""
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._socket]}, daemon=True, name="promptmill-ui"
        )
        self._thread.start()
        while not self._server.started:
            if not self._thread.is_alive():
                self._stack.close()  # an embedded Redis it started stops too
                raise OSError(f"the viewer could not serve on {self.host}:{self.port}")
            time.sleep(0.05)
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
