"""Start real servers on 127.0.0.1 for end-to-end tests and benchmarks, and stop them."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import httpx

from server.launch import engine_env, free_port, running

MODEL_NAME = "SmolLM2-135M-Instruct"
ADMIN_TOKEN = "e2e-admin-token-0123456789abcdef"
# Same engine settings on both sides of every comparison. Tests run in float32 so that δ mode can
# be compared token for token with the SNAP model run by transformers (bf16 kernels differ by up
# to 0.4 in logprob); benchmarks pass bfloat16, the fastest dtype here.
MAX_MODEL_LEN = 2048
DTYPE = "float32"
# Tool calling on both sides (vLLM's flags; the gateway's settings of the same name). Requests
# without tools are unaffected: vLLM only consults the parser when tools are offered.
TOOL_PARSER = "hermes"


def vllm_server_argv(model_path: Path, port: int, *, dtype: str = DTYPE) -> list[str]:
    """vLLM's own OpenAI server on the same model and settings as the gateway's engine."""
    return [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_path),
        "--served-model-name", MODEL_NAME,
        "--dtype", dtype,
        "--max-model-len", str(MAX_MODEL_LEN),
        "--enforce-eager",
        "--enable-prompt-embeds",
        "--enable-auto-tool-choice",
        "--tool-call-parser", TOOL_PARSER,
        "--host", "127.0.0.1",
        "--port", str(port),
        "--disable-log-stats",
    ]  # fmt: skip


def gateway_argv(port: int, *extra: str, dtype: str = DTYPE) -> list[str]:
    """`obliviate serve` on 127.0.0.1."""
    return [
        sys.executable, "-m", "server", "serve",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--served-model-name", MODEL_NAME,
        "--vllm.dtype", dtype,
        "--vllm.max-model-len", str(MAX_MODEL_LEN),
        "--log-level", "warning",
        "--admin-token", ADMIN_TOKEN,
        "--tools.tool-call-parser", TOOL_PARSER,
        "--tools.enable-auto-tool-choice", "true",
        *extra,
    ]  # fmt: skip


def upstream_gateway_argv(
    port: int, upstream_url: str, model_path: Path, data_dir: Path, *extra: str
) -> list[str]:
    """`gateway_argv` in front of an OpenAI server (`upstream_url`, vLLM's), with the local copy
    of the model whose embeddings the guard corrupts, and `data_dir` (its registry)."""
    return gateway_argv(
        port,
        "--engine", "openai_upstream",
        "--upstream.url", f"{upstream_url}/v1",
        "--model", str(model_path),
        "--data-dir", str(data_dir),
        *extra,
    )  # fmt: skip


__all__ = ["engine_env", "free_port", "running"]


def raw_chat_post(
    url: str, body: bytes, *, held_back: int = 0, headers: dict[str, str] | None = None
) -> socket.socket:
    """POST /v1/chat/completions to `url` on a plain socket, all of `body` but its last
    `held_back` bytes: a client that can hang up, or finish its request, when the test says."""
    address = httpx.URL(url)
    conn = socket.create_connection((address.host, address.port), timeout=120)
    lines = [
        "POST /v1/chat/completions HTTP/1.1",
        f"Host: {address.host}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        *(f"{name}: {value}" for name, value in (headers or {}).items()),
    ]
    conn.sendall("\r\n".join([*lines, "", ""]).encode() + body[: len(body) - held_back])
    return conn
