"""A pipeline file (TOML) and its validation: what to ask of each row and how to read the answer."""

from __future__ import annotations

import difflib
import tomllib
from decimal import Decimal
from pathlib import Path
from string import Formatter
from typing import Any, Iterator, Literal

import jsonschema
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from referencing import Registry, Resource
from referencing.exceptions import Unresolvable
from referencing.jsonschema import DRAFT202012

from promptmill.config.prices import ModelPrice, PriceTable
from promptmill.config.settings import Settings, key_variable_refused
from promptmill.pipelines.items import ItemOutcome

_SCHEMA_URI = "urn:promptmill:output-schema"
RECORD_FIELDS = frozenset(ItemOutcome.model_fields)
BRACES_HINT = "a literal brace in the prompt (a JSON example) is written doubled: {{ and }}"


MAX_PRIORITY = 1000  # a job's weight in the fleet's fair shares: 1 (the default) to this
DURATION_PATTERN = r"^\d+(\.\d+)?[smhdw]$"
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}


def duration_s(text: str) -> float:
    """A duration such as 30s, 90m, 8h, 7d or 2w in seconds; ValueError for anything else."""
    try:
        return float(text[:-1]) * _UNIT_S[text[-1]]
    except (KeyError, ValueError, IndexError):
        raise ValueError(f"{text!r} is not a duration such as 30m, 8h or 7d") from None


class PipelineError(ValueError):
    """A pipeline that cannot run; the message names the file and the field."""


class OutputSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    type: Literal["text", "choice", "json"] = "text"
    choices: list[str] | None = None
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")

    @model_validator(mode="after")
    def _fits_type(self) -> "OutputSpec":
        if self.type == "choice":
            if not self.choices or len(self.choices) < 2:
                raise ValueError("output.choices must list at least two labels for type = 'choice'")
            lowered = [choice.strip().lower() for choice in self.choices]
            if len(set(lowered)) != len(lowered) or not all(lowered):
                raise ValueError("output.choices must be distinct, non-empty labels")
        elif self.choices is not None:
            raise ValueError(f"output.choices is only for type = 'choice', not {self.type!r}")
        if self.type == "json":
            if self.json_schema is None:
                raise ValueError("output.schema (a JSON schema) is required for type = 'json'")
            try:
                jsonschema.Draft202012Validator.check_schema(self.json_schema)
            except jsonschema.SchemaError as bad:
                raise ValueError(f"output.schema is not a valid JSON schema: {bad.message}") from None
            _check_refs(self.json_schema)
        elif self.json_schema is not None:
            raise ValueError(f"output.schema is only for type = 'json', not {self.type!r}")
        return self


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("$ref", "$dynamicRef") and isinstance(value, str):
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def _check_refs(schema: dict[str, Any]) -> None:
    """Every `$ref` must point inside the schema: `check_schema` passes a dangling one, and parsing
    would then fail only after each answer was paid for. Remote refs would fetch at parse time."""
    resource = Resource.from_contents(schema, default_specification=DRAFT202012)
    resolver = Registry().with_resource(_SCHEMA_URI, resource).resolver(_SCHEMA_URI)
    for ref in _refs(schema):
        if not ref.startswith("#"):
            raise ValueError(
                f"output.schema: $ref {ref!r} points outside the schema (remote refs are refused); "
                "put what it names under $defs and refer to it as '#/$defs/...'"
            )
        try:
            resolver.lookup(ref)
        except Unresolvable:
            raise ValueError(f"output.schema: $ref {ref!r} does not resolve within the schema") from None


class RateLimits(BaseModel):
    """An account's per-minute limits for one model, as far as the user knows them (None = unknown:
    the provider's rate-limit headers tell the workers)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rpm: int | None = Field(default=None, ge=1, description="Requests per minute.")
    input_tpm: int | None = Field(default=None, ge=1, description="Input tokens per minute (cache reads excluded).")
    output_tpm: int | None = Field(default=None, ge=1, description="Output tokens per minute.")

    def over(self, base: "RateLimits") -> "RateLimits":
        """These limits where given, `base`'s elsewhere."""
        return RateLimits(**{name: getattr(self, name) or getattr(base, name) for name in RateLimits.model_fields})


class EngineOptions(BaseModel):
    """The local engine's settings for this pipeline; each one unset here comes from Settings."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dtype: str | None = None
    max_model_len: int | None = Field(default=None, ge=16)
    gpu_memory_utilization: float | None = Field(default=None, gt=0, le=1)
    tensor_parallel_size: int | None = Field(default=None, ge=1)
    max_num_seqs: int | None = Field(default=None, ge=1)
    enforce_eager: bool | None = None


class PipelinePrice(BaseModel):
    """The pipeline's own prices, USD per million tokens; they win over the price table. A
    self-hosted model states 0 explicitly."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input_per_mtok: Decimal = Field(ge=0)
    output_per_mtok: Decimal = Field(ge=0)
    cache_read_per_mtok: Decimal | None = Field(default=None, ge=0, description="default: the input price")
    cache_write_per_mtok: Decimal | None = Field(default=None, ge=0, description="default: the input price")

    def model_price(self) -> ModelPrice:
        cache_write = self.input_per_mtok if self.cache_write_per_mtok is None else self.cache_write_per_mtok
        return ModelPrice(
            input=self.input_per_mtok,
            output=self.output_per_mtok,
            cache_write_5m=cache_write,
            cache_write_1h=cache_write,
            cache_read=self.input_per_mtok if self.cache_read_per_mtok is None else self.cache_read_per_mtok,
        )


class AttachmentSpec(BaseModel):
    """A column holding a file the model reads: a path, a URL or bytes (pipelines/attachments.py)."""

    model_config = ConfigDict(extra="forbid")

    column: str = Field(min_length=1)
    kind: Literal["image", "document"]
    # "auto": an image over the provider's best size (or its byte limit) is shrunk with Pillow before
    # it is sent; "off": sent as it is, and one over the limit fails its row.
    resize: Literal["auto", "off"] = "off"


class Pipeline(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    model: str = Field(min_length=1)
    system: str | None = None
    prompt: str = Field(min_length=1, description="The user turn; {column} is filled from each row.")
    max_tokens: int = Field(ge=1, le=1_000_000)
    # The installed anthropic SDK has no sampling parameters any more; when set, they are sent to the
    # API as extra body fields (older models take them). The local engine is greedy when unset.
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    stop: list[str] | None = None
    seed: int | None = None
    # Prompt caching (API): the system prompt, and with cache_prefix the prompt's text before its first
    # {column} too (the same for every row), is sent with `cache_control`: written to the provider's
    # cache by the first request and read by the rest at a tenth of the price, for cache_ttl.
    cache_system: bool = False
    cache_prefix: bool = False
    cache_ttl: Literal["5m", "1h"] = "5m"
    output: OutputSpec = Field(default_factory=OutputSpec)
    # false: results keep only the parsed `output`, not the model's text (which may quote the input).
    store_text: bool = True
    # API backends: stream each answer (the SDK's streaming helper assembles it), which measures its
    # time to first token (`ttft_ms`); the usage and the answer are the same. The local engine's
    # time to first token is always measured; a Message Batch is never streamed.
    stream: bool = False
    limits: RateLimits = Field(default_factory=RateLimits)
    engine: EngineOptions = Field(default_factory=EngineOptions)
    # OpenAI-compatible servers: the server's URL (with /v1), over PROMPTMILL_OPENAI_BASE_URL and
    # OPENAI_BASE_URL; and whether `choice` and `json` outputs ask for a JSON schema through
    # `response_format` (OpenAI and vLLM honour it; turn it off for a server that refuses it).
    base_url: str | None = None
    # The variable (in the workers' environment) holding this server's own key. Without it, the
    # fleet's OpenAI key goes to `base_url` only if that is where it was configured for
    # (PROMPTMILL_OPENAI_BASE_URL, OPENAI_BASE_URL or PROMPTMILL_OPENAI_KEY_HOSTS).
    api_key_env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    structured_output: bool = True
    # openai-batch: keep each batch's input file (every row's prompt) at OpenAI after its results are
    # read; by default it is deleted then.
    keep_batch_files: bool = False
    price: PipelinePrice | None = None
    # Models to fall back on, in order, after `model`: "MODEL" on the job's backend, or "BACKEND:MODEL".
    # A row moves on when its attempts on a model are spent on retryable errors or the model is gone
    # (404); the whole fleet moves on once a model has failed with no success for fallback_after_s.
    fallback: list[str] = Field(default_factory=list)
    fallback_after_s: float = Field(default=60.0, gt=0)
    # A batch job's deadline from its submit ("8h", "90m"): once near, the rows still unanswered go
    # through the same provider's real-time API (a batch backend only).
    deadline: str | None = Field(default=None, pattern=DURATION_PATTERN)
    # The job's weight in the fleet's fair shares (`--priority` wins): while jobs wait for the same
    # workers, each gets rows in proportion to its weight.
    priority: int | None = Field(default=None, ge=1, le=MAX_PRIORITY)
    # Results join back to the input: its id column, and other columns, carried into every record
    # under their own names (read from the input at export, never held in Redis).
    id_column: str | None = Field(default=None, min_length=1)
    keep_columns: list[str] = Field(default_factory=list)
    # Images and documents: each a column of the input. Where the prompt names the column, the file
    # goes there in the user turn; otherwise before the text.
    attachments: list[AttachmentSpec] = Field(default_factory=list)

    def price_table(self, settings: Settings) -> PriceTable:
        """The price table this pipeline's jobs are costed by: the shipped and user tables, with the
        pipeline's own `[price]` for its model over both."""
        table = PriceTable.load(settings)
        return table if self.price is None else table.with_model(self.model, self.price.model_price())

    @model_validator(mode="after")
    def _key_of_its_own(self) -> "Pipeline":
        refused = key_variable_refused(self.api_key_env) if self.api_key_env else None
        if refused:
            raise ValueError(refused)
        return self

    @model_validator(mode="after")
    def _cache_has_something(self) -> "Pipeline":
        if self.cache_system and not self.system:
            raise ValueError("cache_system needs a system prompt to cache")
        if self.cache_prefix and not self.shared_prefix:
            raise ValueError("cache_prefix needs text before the prompt's first {column} to cache")
        return self

    @model_validator(mode="after")
    def _prompt_parses(self) -> "Pipeline":
        try:
            columns = self.columns
        except ValueError as bad:
            raise ValueError(f"prompt is not a valid template: {bad}; {BRACES_HINT}") from None
        if any(not column for column in columns):
            raise ValueError("prompt has an empty {} placeholder; name a column, or write {{ }} for a brace")
        return self

    @model_validator(mode="after")
    def _carried_columns_are_free(self) -> "Pipeline":
        clashing = [name for name in self.carried_columns if name in RECORD_FIELDS]
        if clashing:
            raise ValueError(
                f"id_column/keep_columns: {', '.join(map(repr, clashing))} would overwrite the results field "
                f"of that name; carry another column"
            )
        return self

    @model_validator(mode="after")
    def _attachments_once(self) -> "Pipeline":
        columns = [attachment.column for attachment in self.attachments]
        if twice := sorted({column for column in columns if columns.count(column) > 1}):
            raise ValueError(f"attachments: column {', '.join(map(repr, twice))} is attached twice")
        return self

    @property
    def resized(self) -> set[str]:
        """The attachment columns whose images are shrunk to the provider's best size (resize = "auto")."""
        return {attachment.column for attachment in self.attachments if attachment.resize == "auto"}

    @property
    def carried_columns(self) -> list[str]:
        """The input columns every record carries: the id column first, then the kept ones."""
        return list(dict.fromkeys(([self.id_column] if self.id_column else []) + self.keep_columns))

    @property
    def shared_prefix(self) -> str:
        """The prompt's text before its first {column}: the same at the start of every row's prompt."""
        literal = []
        for text, field, _, _ in Formatter().parse(self.prompt):
            literal.append(text)
            if field is not None:
                break
        return "".join(literal)

    @property
    def columns(self) -> list[str]:
        """The row columns the prompt names, in order of first use."""
        names: list[str] = []
        for _, field, _, _ in Formatter().parse(self.prompt):
            if field is not None and field not in names:
                names.append(field)
        return names


def load_pipeline(path: str | Path) -> Pipeline:
    path = Path(path)
    try:
        with path.open("rb") as handle:
            raw = tomllib.load(handle)
    except FileNotFoundError:
        raise PipelineError(f"pipeline file {path} does not exist") from None
    except tomllib.TOMLDecodeError as bad:
        raise PipelineError(f"pipeline file {path} is not valid TOML: {bad}") from None
    except UnicodeDecodeError as bad:
        raise PipelineError(
            f"pipeline file {path} is not UTF-8 text (byte {bad.start}: {bad.reason}); save it as UTF-8"
        ) from None
    try:
        return Pipeline.model_validate(raw)
    except ValidationError as bad:
        raise PipelineError(f"pipeline file {path}: {validation_problems(bad)}") from None


def validation_problems(bad: ValidationError) -> str:
    """Each problem as `field: message`; a key nobody knows gets the nearest known one."""
    problems = []
    for error in bad.errors():
        where = ".".join(str(part) for part in error["loc"]) or "pipeline"
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            message = f"unknown key{_nearest_key(error['loc'])}"
        problems.append(f"{where}: {message}")
    return "; ".join(problems)


def _nearest_key(loc: tuple[Any, ...]) -> str:
    model: type[BaseModel] = Pipeline
    for part in loc[:-1]:  # down to the table the key sits in
        field = model.model_fields.get(str(part))
        annotation = field.annotation if field is not None else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return ""
        model = annotation
    known = [name for name, field in model.model_fields.items()] + [
        field.alias for field in model.model_fields.values() if field.alias
    ]
    near = nearest(str(loc[-1]), known)
    return f"; did you mean {near!r}?" if near else f" (known keys: {', '.join(sorted(set(known)))})"


def nearest(name: str, known: list[str]) -> str | None:
    """The known name closest to a misspelt one (case aside), if any is close."""
    lowered = {candidate.lower(): candidate for candidate in known}
    near = difflib.get_close_matches(name.lower(), list(lowered), n=1, cutoff=0.6)
    return lowered[near[0]] if near else None
