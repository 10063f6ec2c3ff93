"""A real obliviate gateway as a subprocess, and the HTTP calls an operator and a client make."""

from __future__ import annotations

import logging
import secrets
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx

from server.launch import engine_env, free_port, start_server, stop_server

logger = logging.getLogger(__name__)

SERVED_NAME = "tofu"
T = TypeVar("T")
R = TypeVar("R")


class GatewayFailedError(RuntimeError):
    """The gateway did not start, or a registration job failed."""


_RETRIES = 3


@dataclass
class Gateway:
    """HTTP client of a running gateway: chat completions and the admin API."""

    base_url: str
    token: str
    concurrency: int = 16
    timeout_s: float = 900.0
    model: str = SERVED_NAME
    api_key: str | None = None

    def __post_init__(self) -> None:
        self._http = httpx.Client(base_url=self.base_url, timeout=self.timeout_s)
        self._admin = {"Authorization": f"Bearer {self.token}"}

    def close(self) -> None:
        self._http.close()

    def _post(self, path: str, body: dict[str, Any], *, admin: bool = False) -> Any:
        client = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else None
        for attempt in range(_RETRIES + 1):
            try:
                r = self._http.post(path, json=body, headers=self._admin if admin else client)
                break
            except httpx.RemoteProtocolError:
                # The server closed a kept-alive connection as the request went out (uvicorn
                # drops connections idle for 5 s; scoring between requests on a busy machine
                # takes longer). The measuring requests read only, so they are sent again;
                # admin calls (a registration) are not repeated.
                if admin or attempt == _RETRIES:
                    raise
        if r.status_code >= 400:
            raise GatewayFailedError(f"POST {path}: {r.status_code} {r.text[:500]}")
        return r.json()

    def map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        """`fn` over `items` with `concurrency` requests in flight (the engine batches them)."""
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(fn, items))

    def chat(self, messages: list[dict[str, str]], *, max_tokens: int) -> str:
        """Greedy reply text."""
        body = {
            "model": self.model,
            "messages": messages,
            "temperature": 0,
            "max_tokens": max_tokens,
        }
        return str(self._post("/v1/chat/completions", body)["choices"][0]["message"]["content"])

    def first_token_logprobs(self, messages: list[dict[str, str]]) -> dict[str, float]:
        """Top-20 log-probabilities of the reply's first token (multiple-choice scoring)."""
        body = {
            "model": self.model,
            "messages": messages,
            "temperature": 0,
            "max_tokens": 1,
            "logprobs": True,
            "top_logprobs": 20,
        }
        content = self._post("/v1/chat/completions", body)["choices"][0]["logprobs"]["content"]
        return {t["token"]: float(t["logprob"]) for t in content[0]["top_logprobs"]}

    def answer_logprobs(self, messages: list[dict[str, str]], answer: str) -> list[float]:
        """Teacher-forced log-probability of each token of `answer` as the reply to `messages`,
        through the gateway itself: the answer goes in as the final assistant turn (continued,
        not closed), and the engine's prompt logprobs are those of what it read (for a flagged
        conversation, the corrupted embeddings; the guard reads the answer too)."""
        prefix = self._post(
            "/tokenize", {"model": self.model, "messages": messages, "add_generation_prompt": True}
        )["tokens"]
        body = {
            "model": self.model,
            "messages": [*messages, {"role": "assistant", "content": answer}],
            "add_generation_prompt": False,
            "continue_final_message": True,
            "temperature": 0,
            "max_tokens": 1,
            "prompt_logprobs": 0,
        }
        positions = self._post("/v1/chat/completions", body)["prompt_logprobs"]
        whole = self._post(
            "/tokenize",
            {
                "model": self.model,
                "messages": body["messages"],
                "add_generation_prompt": False,
                "continue_final_message": True,
            },
        )["tokens"]
        if whole[: len(prefix)] != prefix or len(whole) != len(positions):
            raise GatewayFailedError("the answer does not extend the templated prompt")
        # With prompt_logprobs=0 each position lists the prompt's own token only.
        return [
            float(positions[i][str(whole[i])]["logprob"]) for i in range(len(prefix), len(whole))
        ]

    def register(self, target: dict[str, Any], *, timeout_s: float = 3600.0) -> dict[str, Any]:
        """POST /admin/targets and wait for the job; returns the active target's record."""
        job = self._post("/admin/targets", target, admin=True)
        deadline = time.monotonic() + timeout_s
        last = ""
        while time.monotonic() < deadline:
            job = self._http.get(f"/admin/jobs/{job['id']}", headers=self._admin).json()
            if job["status"] == "failed":
                raise GatewayFailedError(f"registration failed: {job.get('error')}")
            if job["status"] == "succeeded":
                break
            if job["stage"] != last:
                logger.info("registration: %s (%.0f%%)", job["stage"], 100 * job["progress"])
                last = job["stage"]
            time.sleep(2)
        else:
            raise GatewayFailedError(f"registration did not finish in {timeout_s:.0f} s")
        r = self._http.get(f"/admin/targets/{job['target_id']}", headers=self._admin)
        record: dict[str, Any] = r.json()
        if not record.get("active"):
            raise GatewayFailedError(f"target not active after its job: {record}")
        return record

    def delete_target(self, target_id: str) -> None:
        r = self._http.delete(f"/admin/targets/{target_id}", headers=self._admin)
        if r.status_code != 204:
            raise GatewayFailedError(f"DELETE target: {r.status_code} {r.text[:300]}")

    def classify(self, messages: list[dict[str, str]]) -> dict[str, Any]:
        """Dry run of the guard on `messages`: flagged, and each target's decision."""
        result: dict[str, Any] = self._post("/admin/classify", {"messages": messages}, admin=True)
        return result


def gateway_command(
    model_dir: Path,
    *,
    port: int,
    workdir: Path,
    token: str,
    dtype: str = "float32",
    extra_args: Sequence[str] = (),
) -> tuple[list[str], dict[str, str]]:
    """The argv and environment of `obliviate serve --model DIR` on 127.0.0.1:`port`.

    The admin token goes in the environment, not argv: a token_urlsafe token may begin with
    "-", which argparse reads as the next flag (and argv is visible to every user in `ps`).
    """
    argv = [
        sys.executable, "-m", "server", "serve",
        "--model", str(model_dir),
        "--served-model-name", SERVED_NAME,
        "--host", "127.0.0.1",
        "--port", str(port),
        "--data-dir", str(workdir / f"data-{model_dir.name}"),
        "--vllm.dtype", dtype,
        "--vllm.max-model-len", "1024",
        "--log-level", "warning",
        *extra_args,
    ]  # fmt: skip
    return argv, {**engine_env(), "OBLIVIATE_ADMIN_TOKEN": token}


@contextmanager
def run_gateway(
    model_dir: Path,
    *,
    workdir: Path,
    dtype: str = "float32",
    ready_timeout_s: float = 900.0,
    extra_args: Sequence[str] = (),
) -> Iterator[Gateway]:
    """`obliviate serve --model DIR` on a free local port until the block ends."""
    port = free_port()
    token = secrets.token_urlsafe(24)
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / f"gateway-{model_dir.name}.log"
    argv, env = gateway_command(
        model_dir, port=port, workdir=workdir, token=token, dtype=dtype, extra_args=extra_args
    )
    try:
        proc = start_server(
            argv,
            ready_url=f"http://127.0.0.1:{port}/ready",
            log=log,
            env=env,
            timeout_s=ready_timeout_s,
        )
    except (RuntimeError, TimeoutError) as e:
        raise GatewayFailedError(f"the gateway did not start: {e}") from e
    gateway = Gateway(f"http://127.0.0.1:{port}", token)
    try:
        yield gateway
    finally:
        gateway.close()
        stop_server(proc)
