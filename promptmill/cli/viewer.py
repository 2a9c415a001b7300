"""`promptmill ui`: the live viewer, served here until Ctrl-C."""

from __future__ import annotations

import typer

from promptmill.api.viewer import DEFAULT_PORT, ui as start_viewer
from promptmill.cli.app import app, err, fail, out
from promptmill.cli.running import sigterm_as_interrupt

_LOCAL = ("127.0.0.1", "localhost", "::1")


@app.command()
def ui(
    port: int = typer.Option(DEFAULT_PORT, "--port", min=0, max=65535, help="The port (0: any free one)."),
    host: str = typer.Option("127.0.0.1", "--host", help="The address to listen on (others than this machine's "
                             "own reach it only with the token)."),  # fmt: skip
) -> None:
    """Watch and steer the jobs in this Redis in a browser: their progress, pace, cost and rows, live.
    Prints its URL with a token that every request needs; nothing is sent anywhere."""
    try:
        viewer = start_viewer(port=port, host=host)
    except OSError as taken:
        fail(str(taken))
    if host not in _LOCAL:
        err.print(f"note: listening on {host}: anyone who can reach it and holds the token can act on your jobs",
                  highlight=False)  # fmt: skip
    out.print(f"promptmill ui: {viewer.url}", highlight=False, soft_wrap=True)
    err.print("Ctrl-C stops it", highlight=False)
    sigterm_as_interrupt()  # `kill` (make ui-demo's end) stops it as Ctrl-C does: an embedded Redis it started too
    viewer.wait()
