"""A compare's plan: its contenders, the sample every one of them answers, and the job each runs as.

The plan is kept in `DIR/compare.json` and the sample in `DIR/sample.jsonl`: the same command run again
finds them, and resumes each contender's job where it stopped instead of starting (and paying) anew.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import Any

import orjson
from pydantic import BaseModel, Field

from promptmill.jobs.files import atomic_write
from promptmill.jobs.readers import InputFormat, InvalidRow, iter_rows
from promptmill.config.backends import BACKENDS, BackendName

# What a contender may set over the pipeline's own value: `vllm:smollm2,temperature=1.0`.
CONTENDER_SETTINGS: dict[str, type] = {"temperature": float, "top_p": float, "max_tokens": int, "seed": int}
PLAN_FILE, SAMPLE_FILE = "compare.json", "sample.jsonl"


class CompareError(ValueError):
    """A compare that cannot run as asked; the message names the option."""


class Contender(BaseModel):
    backend: BackendName
    model: str
    settings: dict[str, float | int] = Field(default_factory=dict)
    # What running it recorded: its job, and once the job stopped, how (its records are then in its folder).
    job_id: str | None = None
    state: str | None = None
    error: str | None = None
    cost_usd: float | None = None

    @property
    def name(self) -> str:
        return f"{self.backend}:{self.model}" + "".join(f",{key}={value}" for key, value in self.settings.items())

    @property
    def folder(self) -> str:
        """Its job's folder under DIR: readable, and safe for any model name."""
        safe = "".join(c if c.isalnum() or c in "-._" else "-" for c in self.name.replace(",", "_"))
        return f"contenders/{safe}"


def parse_contender(text: str) -> Contender:
    """`BACKEND:MODEL[,KEY=VALUE...]`, KEY one of CONTENDER_SETTINGS."""
    head, *pairs = text.split(",")
    backend, colon, model = head.partition(":")
    if not colon or not model.strip():
        raise CompareError(f"--against {text!r}: write BACKEND:MODEL, e.g. anthropic:claude-haiku-4-5")
    if backend not in BACKENDS:
        raise CompareError(f"--against {text!r}: backend {backend!r} is not one of {', '.join(BACKENDS)}")
    settings: dict[str, float | int] = {}
    for pair in pairs:
        key, equals, value = (part.strip() for part in pair.partition("="))
        if not equals or key not in CONTENDER_SETTINGS:
            raise CompareError(
                f"--against {text!r}: {pair!r} is not KEY=VALUE with KEY one of {', '.join(CONTENDER_SETTINGS)}"
            )
        try:
            settings[key] = CONTENDER_SETTINGS[key](value)
        except ValueError:
            raise CompareError(f"--against {text!r}: {key} must be a number, not {value!r}") from None
    return Contender(backend=backend, model=model.strip(), settings=settings)  # type: ignore[arg-type]


class ComparePlan(BaseModel):
    input_path: str
    input_format: InputFormat
    pipeline_path: str
    sample: int = Field(description="The rows asked for.")
    seed: int
    label: str | None
    contenders: list[Contender]
    rows: list[int] = Field(default_factory=list, description="The sampled rows' numbers in the input, in order.")
    input_rows: int = 0  # readable rows in the input, for the projections
    unreadable_rows: int = 0
    #: The folder the rows' relative file paths are in (None: the input's own): the contenders read a
    #: sample copied into the compare's folder, and their files where the input's rows name them.
    attachment_root: str | None = None

    def asks_the_same(self, other: "ComparePlan") -> bool:
        """The same compare: what a user typed, without what running it recorded."""
        fields = ("input_path", "input_format", "pipeline_path", "sample", "seed", "label")
        names = [contender.name for contender in self.contenders]
        return all(getattr(self, f) == getattr(other, f) for f in fields) and names == [c.name for c in other.contenders]

    def save(self, folder: Path) -> None:
        with atomic_write(folder / PLAN_FILE) as handle:
            handle.write(orjson.dumps(self.model_dump(mode="json"), option=orjson.OPT_INDENT_2))

    @classmethod
    def load(cls, folder: Path) -> "ComparePlan | None":
        path = folder / PLAN_FILE
        return cls.model_validate_json(path.read_bytes()) if path.exists() else None


def default_folder(plan: ComparePlan) -> Path:
    """The same command's folder every time (so running it again resumes): named by what it asks."""
    asked = orjson.dumps([plan.input_path, plan.pipeline_path, plan.sample, plan.seed, [c.name for c in plan.contenders]])
    return Path("promptmill-out") / f"compare-{Path(plan.input_path).stem}-{hashlib.sha256(asked).hexdigest()[:8]}"


def draw_sample(plan: ComparePlan, folder: Path, max_row_bytes: int) -> list[dict[str, Any]]:
    """A seeded uniform sample of the input's readable rows in one pass (reservoir sampling: the input
    is never held), written in input order to `folder/sample.jsonl`; fills the plan's row counts."""
    rng = random.Random(plan.seed)
    kept: list[tuple[int, dict[str, Any]]] = []
    readable = unreadable = 0
    for number, _, row in iter_rows(Path(plan.input_path), plan.input_format, max_row_bytes=max_row_bytes):
        if isinstance(row, InvalidRow):
            unreadable += 1
            continue
        if readable < plan.sample:
            kept.append((number, row))
        else:
            slot = rng.randrange(readable + 1)
            if slot < plan.sample:
                kept[slot] = (number, row)
        readable += 1
    kept.sort(key=lambda pair: pair[0])
    if plan.label is not None and kept and not any(plan.label in row for _, row in kept):
        raise CompareError(f"--label {plan.label}: no sampled row has that column (they have: {', '.join(kept[0][1])})")
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_write(folder / SAMPLE_FILE) as handle:
        for _, row in kept:
            handle.write(orjson.dumps(row, default=str) + b"\n")
    plan.rows = [number for number, _ in kept]
    plan.input_rows, plan.unreadable_rows = readable, unreadable
    return [row for _, row in kept]


def read_sample(folder: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in (folder / SAMPLE_FILE).read_bytes().splitlines() if line.strip()]
