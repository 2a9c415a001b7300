"""examples/quickstart.ipynb, executed as a user's Jupyter would run it (nbclient, a real kernel), on
the local engine and the embedded Redis: the API's first hour in a notebook."""

from __future__ import annotations

import json
import os
import re

import nbformat
import pytest
from nbclient import NotebookClient

from tests.conftest import ENGINE_MEMORY_SHARE
from tests.support import ROOT

pytestmark = pytest.mark.vllm
ROWS = 24


def test_the_quickstart_notebook_runs_the_demo_through_the_api_on_the_local_model(tmp_path, monkeypatch):
    for name in list(os.environ):
        if name.startswith(("PROMPTMILL_", "ANTHROPIC_")):
            monkeypatch.delenv(name)  # no Redis URL: the notebook's pm.run starts the embedded one
    monkeypatch.setenv("PROMPTMILL_DATA_DIR", str(tmp_path / "data"))
    # The notebook's own switch to the smaller local model: Gemma 3 270M's engine needs a memory share
    # (0.3) that, beside the other test processes' engines, starves this machine.
    monkeypatch.setenv("QUICKSTART_MODEL", "smollm2-135m-instruct")
    monkeypatch.setenv("PROMPTMILL_VLLM_GPU_MEMORY_UTILIZATION", ENGINE_MEMORY_SHARE)
    monkeypatch.setenv("QUICKSTART_ROWS", str(ROWS))
    notebook = nbformat.read(ROOT / "examples" / "quickstart.ipynb", as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT / "examples")}}).execute()

    def text_of(cell) -> str:
        parts = []
        for output in cell.get("outputs", []):
            parts.append(output.get("text", "") + output.get("data", {}).get("text/plain", ""))
        return "".join(parts)

    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(output.get("output_type") != "error" for cell in code for output in cell.get("outputs", []))
    shown = text_of(code[2])  # the Results' repr
    assert re.search(rf"<Results job=\S+ complete rows={ROWS} cost=\$", shown), shown
    printed = text_of(code[-1])
    match = re.search(rf"accuracy: ([0-9.]+)% of {ROWS} reviews; cost \$", printed)
    assert match, printed
    results = [json.loads(line) for line in (ROOT / "demo-out" / "notebook" / "results.jsonl").open()]
    labels = [json.loads(line)["label"] for line in (ROOT / "examples" / "reviews.jsonl").open()][:ROWS]
    right = sum(record["output"] == label for record, label in zip(results, labels))
    assert len(results) == ROWS and float(match.group(1)) == pytest.approx(100 * right / ROWS, abs=0.05)
