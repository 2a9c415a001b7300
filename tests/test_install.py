"""promptmill installs under one name, so a user's own `config`, `jobs`, `workers` or `pipelines`
package (Django and cookiecutter layouts have them) never stands in for ours, nor ours for theirs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT, promptmill, read_jsonl
from tests.test_api_jobs import LABELS, write_job

USER_PACKAGES = ("config", "jobs", "workers", "pipelines")


def a_project_with_its_own_packages(folder: Path) -> Path:
    for name in USER_PACKAGES:
        package = folder / name
        package.mkdir(parents=True)
        (package / "__init__.py").write_text(f'raise ImportError("the user\'s own {name} package was imported")\n')
        (package / "settings.py").write_text("DEBUG = True\n")
    return folder


def test_the_generic_names_are_not_importable_from_outside_the_repo(tmp_path):
    for name in USER_PACKAGES:
        found = subprocess.run(
            [sys.executable, "-c", f"import importlib.util, sys; sys.exit(importlib.util.find_spec({name!r}) is not None)"],
            cwd=tmp_path,
        )
        assert found.returncode == 0, f"`import {name}` works outside the repo"
    ours = subprocess.run([sys.executable, "-c", "import promptmill.config.settings"], cwd=tmp_path)
    assert ours.returncode == 0


def test_a_job_runs_from_a_folder_holding_its_own_config_jobs_workers_and_pipelines(tmp_path, env, fake_api):
    project = a_project_with_its_own_packages(tmp_path / "project")
    data, pipeline = write_job(tmp_path, 40)
    out = tmp_path / "out"
    result = promptmill("run", str(data), "--pipeline", str(pipeline), "--out", str(out), env=env, cwd=project)
    assert result.returncode == 0, result.stderr
    records = read_jsonl(out / "results.jsonl")
    assert [record["output"] for record in records] == [LABELS[i % 2] for i in range(40)]
    worker_logs = "".join(path.read_text() for path in (out / "logs").glob("*.log"))
    assert "the user's own" not in worker_logs


# The rooms of the code, lowest first: a module imports only from its own room and those before it.
# Inside workers/ the rooms are ordered too (what a transport needs, the transports, the layers, the
# path, the runtime, the Celery face); the views (reports/) never import the workers, nor they it.
ROOMS: list[tuple[str, tuple[str, ...]]] = [
    ("config", ("config",)),
    ("pipelines", ("pipelines",)),
    ("jobs.spec", ("jobs/spec.py",)),
    ("jobs.state", ("jobs/state",)),
    ("jobs", ("jobs",)),
    ("workers.low", tuple(f"workers/{name}.py" for name in (
        "retry", "limit_signals", "concurrency", "engine_clock", "local_model", "metrics", "rate_limit",
        "metrics_server", "local_workers"))),
    ("workers.backends", ("workers/backends",)),
    ("workers.layers", ("workers/layers.py",)),
    ("workers.path", ("workers/request_path.py", "workers/fallback.py")),
    ("workers.runtime", ("workers/runtime.py",)),
    ("workers", ("workers",)),
    ("reports", ("reports",)),
    ("faces", ("promptmill",)),
]  # fmt: skip
PACKAGES = {"promptmill.config": "config", "promptmill.pipelines": "pipelines", "promptmill.jobs": "jobs",
            "promptmill.reports": "reports", "promptmill.workers": "workers", "promptmill": "promptmill"}  # fmt: skip


def _room_of(path: str) -> int:
    """The room of a file of the tree (the most specific one naming it)."""
    best, length = -1, -1
    for index, (_, places) in enumerate(ROOMS):
        for place in places:
            if (path == place or path.startswith(place + "/")) and len(place) > length:
                best, length = index, len(place)
    return best


def _file_of(module: str) -> str | None:
    """The tree's file of a `promptmill...` module, or None (a name imported from a module)."""
    for package, folder in sorted(PACKAGES.items(), key=lambda item: -len(item[0])):
        if module == package or module.startswith(package + "."):
            relative = folder + module[len(package):].replace(".", "/")
            for candidate in (relative + ".py", relative + "/__init__.py"):
                if (ROOT / candidate).exists():
                    return candidate
            return None
    return None


def _imports(path: Path) -> set[str]:
    """The tree's files a module imports (an imported name that is a module counts as one)."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        modules = []
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            modules = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for module in modules:
            file = _file_of(module)
            if file is not None:
                found.add(file)
    return found


def _tree() -> dict[str, set[str]]:
    sources = [path for folder in ("config", "pipelines", "jobs", "reports", "workers", "promptmill")
               for path in (ROOT / folder).rglob("*.py")]  # fmt: skip
    return {path.relative_to(ROOT).as_posix(): _imports(path) - {path.relative_to(ROOT).as_posix()} for path in sources}


def test_each_room_imports_only_the_rooms_below_it_and_no_import_runs_in_a_circle():
    tree = _tree()
    upward = [
        f"{module} ({ROOMS[_room_of(module)][0]}) imports {imported} ({ROOMS[_room_of(imported)][0]})"
        for module, imports in tree.items() for imported in imports
        if _room_of(imported) > _room_of(module) and not imported.endswith("__init__.py")
    ]  # fmt: skip
    assert upward == []
    views = [f"{m} imports {i}" for m, imports in tree.items() for i in imports
             if m.startswith("reports/") and i.startswith("workers/") or m.startswith("workers/") and i.startswith("reports/")]  # fmt: skip
    assert views == []
    # No cycle between modules either: each can be read knowing only what it imports.
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for imported in tree.get(module, ()):
            if state.get(imported) == 1:
                raise AssertionError("an import cycle: " + " -> ".join([*path, module, imported]))
            if imported not in state:
                visit(imported, [*path, module])
        state[module] = 2

    for module in tree:
        if module not in state:
            visit(module, [])


def test_no_code_tests_a_backends_name_outside_its_descriptor():
    """A backend's identity is its descriptor's (config/backends.py): nothing compares its name."""
    import re

    compares = re.compile(r"""backend\w*\s*(==|!=|\bin\b)\s*\(?\s*["']|["'][a-z-]+["']\s*(==|!=|\bin\b)\s*[\w.]*backend""")
    found = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for folder in ("config", "pipelines", "jobs", "reports", "workers", "promptmill")
        for path in (ROOT / folder).rglob("*.py") if path != ROOT / "config" / "backends.py"
        for number, line in enumerate(path.read_text().splitlines(), 1) if compares.search(line)
    ]  # fmt: skip
    assert found == []


def test_no_module_of_the_package_passes_400_lines():
    long = {
        path.relative_to(ROOT).as_posix(): count
        for folder in ("config", "pipelines", "jobs", "reports", "workers", "promptmill")
        for path in (ROOT / folder).rglob("*.py")
        if (count := len(path.read_text().splitlines())) > 400
    }
    assert long == {}


def test_the_viewers_actions_answer_in_an_install_without_the_engine_extras(tmp_path, env, fake_api):
    """`pip install promptmill` alone (no vllm, whose server brought python-multipart along): the
    viewer's action forms are read, and a budget set from the page becomes the job's cap."""
    import json
    import re
    import shutil
    import urllib.request

    from promptmill.web.guard import csrf_value
    from tests.support import stop, wait_until

    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__",
                                                                 "tests", "docs", "bench", "examples", "deploy"))  # fmt: skip
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    installed = subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", str(source)], capture_output=True, text=True)
    assert installed.returncode == 0, installed.stderr[-3000:]
    assert subprocess.run([str(venv / "bin" / "python"), "-c", "import vllm"], capture_output=True).returncode != 0

    data, pipeline = write_job(tmp_path, 2)
    ran = promptmill("run", str(data), "--pipeline", str(pipeline), "--out", str(tmp_path / "out"), "--json", env=env)
    assert ran.returncode == 0, ran.stderr
    job_id = json.loads(ran.stdout)["job_id"]
    viewer = subprocess.Popen([str(venv / "bin" / "promptmill"), "ui", "--port", "0"], env=env, cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        line = viewer.stdout.readline()
        match = re.search(r"(http://127\.0\.0\.1:\d+)/\?token=(\S+)", line)
        assert match, line + (viewer.stderr.read() if viewer.poll() is not None else "")
        base, token = match.groups()
        form = f"csrf={csrf_value(token)}&usd=0.5".encode()
        request = urllib.request.Request(f"{base}/jobs/{job_id}/budget", data=form, method="POST",
                                         headers={"Authorization": f"token {token}",
                                                  "Content-Type": "application/x-www-form-urlencoded"})  # fmt: skip
        with urllib.request.urlopen(request, timeout=60) as answer:  # the redirect back to the job's page
            assert answer.status == 200
        status = lambda: json.loads(promptmill("status", job_id, "--json", env=env).stdout)  # noqa: E731
        wait_until(lambda: status()["budget"]["cap_usd"] == 0.5, 30, "the budget set from the page")
    finally:
        stop(viewer)
