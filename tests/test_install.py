"""promptmill installs under one name, so a user's own `config`, `jobs`, `workers` or `pipelines`
package (Django and cookiecutter layouts have them) never stands in for ours, nor ours for theirs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import promptmill, read_jsonl
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


LAYERS = ["config", "pipelines", "jobs", "workers", "cli"]  # each may import only those before it


def test_each_layer_imports_only_the_layers_before_it():
    import ast

    root = Path(__file__).resolve().parent.parent
    folders = {"config": root / "config", "pipelines": root / "pipelines", "jobs": root / "jobs",
               "workers": root / "workers", "cli": root / "promptmill" / "cli"}  # fmt: skip
    wrong = []
    for layer, folder in folders.items():
        allowed = set(LAYERS[: LAYERS.index(layer) + 1])
        for module in folder.rglob("*.py"):
            for node in ast.walk(ast.parse(module.read_text())):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                names += [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
                for name in names:
                    parts = name.split(".")
                    if parts[0] == "promptmill" and len(parts) > 1 and parts[1] in LAYERS and parts[1] not in allowed:
                        wrong.append(f"{module.relative_to(root)} imports {name}")
    assert wrong == []
