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
    """Where converted models live; default: the user cache dir (XDG)."""
    data_dir: Path = Path(".obliviate")
    """Registry database and artifacts."""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """Log level of the gateway and the engine."""
    log_prompts: bool = False
    """Log request text (off: only ids, sizes and decisions are logged)."""
    vllm: VllmSettings = VllmSettings()
    upstream: UpstreamSettings = UpstreamSettings()

    @model_validator(mode="after")
    def _check_engine(self) -> Settings:
        if self.engine == "openai_upstream" and not self.upstream.url:
            raise ValueError("engine=openai_upstream needs upstream.url (OBLIVIATE_UPSTREAM__URL)")
        return self

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
