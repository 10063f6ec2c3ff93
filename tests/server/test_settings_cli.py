"""Settings sources (flags > environment > TOML file > defaults) and the CLI's help."""

from __future__ import annotations

import subprocess
import sys

import pytest
from pydantic import ValidationError

from server.settings import Settings

TOKEN = "settings-test-token-0123456789"


def test_environment_and_config_file(tmp_path, monkeypatch):
    config = tmp_path / "obliviate.toml"
    config.write_text('port = 9100\nlog_level = "debug"\n[vllm]\nmax_model_len = 4096\n')
    monkeypatch.setenv("OBLIVIATE_CONFIG_FILE", str(config))
    monkeypatch.setenv("OBLIVIATE_ADMIN_TOKEN", TOKEN)
    monkeypatch.setenv("OBLIVIATE_LOG_LEVEL", "warning")
    monkeypatch.setenv("OBLIVIATE_VLLM__DTYPE", "float32")
    settings = Settings()
    assert settings.port == 9100  # file
    assert settings.log_level == "warning"  # environment beats the file
    assert (settings.vllm.max_model_len, settings.vllm.dtype) == (4096, "float32")
    assert Settings(port=9200).port == 9200  # explicit values beat both
    assert settings.admin_token is not None and settings.admin_token.get_secret_value() == TOKEN


def test_missing_config_file_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("OBLIVIATE_CONFIG_FILE", "/nonexistent/obliviate.toml")
    with pytest.raises(ValueError, match="no such file"):
        Settings(admin_token=TOKEN)


def test_invalid_values_are_refused(monkeypatch):
    monkeypatch.setenv("OBLIVIATE_VLLM__KV_CACHE_GIB", "-1")
    with pytest.raises(ValidationError, match="kv_cache_gib"):
        Settings(admin_token=TOKEN)
    monkeypatch.delenv("OBLIVIATE_VLLM__KV_CACHE_GIB")
    with pytest.raises(ValidationError, match="upstream.url"):
        Settings(admin_token=TOKEN, engine="openai_upstream")
    with pytest.raises(ValidationError, match="16 characters"):
        Settings(admin_token="short")


def test_serve_help_documents_every_setting():
    out = subprocess.run(
        [sys.executable, "-m", "server", "serve", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for flag in (
        "--port",
        "--model",
        "--engine",
        "--admin-token",
        "--vllm.max-model-len",
        "--upstream.url",
        "--guard.enabled",
        "--registry-url",
    ):
        assert flag in out, flag
    assert "Context length in tokens" in out  # field docstrings are the help text
