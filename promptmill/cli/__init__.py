"""The `promptmill` command line: the entry point, above every layer it drives."""

from __future__ import annotations

from promptmill.cli import comparing, inspecting, managing, running, worker  # noqa: F401 - each registers its commands
from promptmill.cli.app import app


def main() -> None:
    app()
