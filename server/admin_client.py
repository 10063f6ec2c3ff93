"""A small synchronous client of the gateway's admin API (used by `obliviate targets`).

It speaks JSON to `/admin` with the bearer token and turns the gateway's OpenAI-style error
envelope into `AdminAPIError`; it knows nothing of the server's internals, so it works against
any gateway of the same API version, local or remote.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"
FINISHED = ("succeeded", "failed")

Json = dict[str, Any]


class AdminAPIError(Exception):
    """The gateway answered with an error envelope (or a non-JSON error)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def __str__(self) -> str:
        where = f" (param: {self.param})" if self.param else ""
        return f"{self.status} {self.type or 'error'}: {self.message}{where}"


class GatewayUnreachableError(Exception):
    """No answer from the gateway at all (wrong URL, not running, network)."""


class WaitTimeoutError(Exception):
    """A job did not end within the time given."""


class AdminClient:
    """Typed-enough calls for each admin endpoint; results are the API's JSON objects."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        token: str | None = None,
        *,
        timeout_s: float = 30.0,
        http: httpx.Client | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = http or httpx.Client(timeout=timeout_s)
        self._headers = headers

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(
        self, method: str, path: str, *, json: Any = None, params: dict[str, Any] | None = None
    ) -> Any:
        url = f"{self.base_url}{path}"
        try:
            response = self._http.request(
                method, url, json=json, params=params, headers=self._headers
            )
        except httpx.TransportError as e:
            raise GatewayUnreachableError(f"cannot reach {self.base_url}: {e}") from e
        if response.status_code >= 400:
            raise _error(response)
        if response.status_code == 204 or not response.content:
            return None
        return response.json()

    # --- targets ---------------------------------------------------------------------------

    def create_target(self, body: Json) -> Json:
        """POST /admin/targets: the queued registration job."""
        job: Json = self._call("POST", "/admin/targets", json=body)
        return job

    def list_targets(self) -> list[Json]:
        data: list[Json] = self._call("GET", "/admin/targets")["data"]
        return data

    def get_target(self, target_id: str) -> Json:
        target: Json = self._call("GET", f"/admin/targets/{target_id}")
        return target

    def resolve_target(self, ref: str) -> Json:
        """A target by id, or by its exact name (then case-insensitively) if no id matches."""
        targets = self.list_targets()
        for matches in (
            [t for t in targets if t["id"] == ref],
            [t for t in targets if t["name"] == ref],
            [t for t in targets if t["name"].lower() == ref.lower()],
        ):
            if len(matches) == 1:
                return matches[0]
        raise AdminAPIError(404, f"No target with the id or name {ref!r}", type="not_found_error")

    def update_target(self, target_id: str, changes: Json) -> Json:
        target: Json = self._call("PATCH", f"/admin/targets/{target_id}", json=changes)
        return target

    def delete_target(self, target_id: str) -> None:
        self._call("DELETE", f"/admin/targets/{target_id}")

    # --- jobs ------------------------------------------------------------------------------

    def list_jobs(self, target_id: str | None = None, limit: int = 100) -> list[Json]:
        params: dict[str, Any] = {"limit": limit}
        if target_id:
            params["target_id"] = target_id
        data: list[Json] = self._call("GET", "/admin/jobs", params=params)["data"]
        return data

    def get_job(self, job_id: str) -> Json:
        job: Json = self._call("GET", f"/admin/jobs/{job_id}")
        return job

    def wait_job(
        self,
        job_id: str,
        *,
        on_update: Callable[[Json], None] | None = None,
        poll_s: float = 1.0,
        timeout_s: float | None = None,
    ) -> Json:
        """Poll the job until it succeeds or fails; `on_update` sees every state read."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            job = self.get_job(job_id)
            if on_update is not None:
                on_update(job)
            if job["status"] in FINISHED:
                return job
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeoutError(
                    f"job {job_id} still {job['status']} ({job['stage']}) after {timeout_s:g} s"
                )
            time.sleep(poll_s)

    # --- dry runs --------------------------------------------------------------------------

    def classify(self, *, prompt: str | None = None, messages: list[Json] | None = None) -> Json:
        body = {"prompt": prompt} if messages is None else {"messages": messages}
        result: Json = self._call("POST", "/admin/classify", json=body)
        return result


def _error(response: httpx.Response) -> AdminAPIError:
    try:
        err = response.json()["error"]
        return AdminAPIError(
            response.status_code,
            str(err.get("message")),
            type=err.get("type"),
            param=err.get("param"),
            code=err.get("code"),
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        text = response.text.strip()[:300] or response.reason_phrase
        return AdminAPIError(response.status_code, text)
