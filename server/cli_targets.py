"""`obliviate targets …`: the admin API from a terminal (server.admin_client underneath).

Gateway URL and token come from `--url` / `--token` / `--token-file`, else `OBLIVIATE_URL` /
`OBLIVIATE_ADMIN_TOKEN`. Every command takes `--json` (the API's JSON on stdout, for scripts).
Exit codes: 0 done, 1 the gateway refused (or the job failed), 2 bad usage, 3 gateway
unreachable, 4 timed out waiting.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError
from pydantic_settings import (
    BaseSettings,
    CliApp,
    CliImplicitFlag,
    CliPositionalArg,
    CliSubCommand,
    SettingsConfigDict,
)

from server.admin_client import (
    DEFAULT_URL,
    AdminAPIError,
    AdminClient,
    GatewayUnreachableError,
    Json,
    WaitTimeoutError,
)
from server.cli_output import Output

OK, FAILED, USAGE, UNREACHABLE, TIMED_OUT = 0, 1, 2, 3, 4


class UsageError(Exception):
    """The command line or its file is wrong (exit 2)."""


class _Connection(BaseModel):
    model_config = ConfigDict(use_attribute_docstrings=True, populate_by_name=True, extra="forbid")

    url: str | None = None
    """Gateway base URL (default: $OBLIVIATE_URL, else http://127.0.0.1:8000)."""
    token: SecretStr | None = None
    """Admin token (default: $OBLIVIATE_ADMIN_TOKEN). Prefer the variable or --token-file:
    flags show in the process list."""
    token_file: Path | None = None
    """File holding the admin token, e.g. .obliviate/admin-token (written by `make serve`)."""
    json_output: CliImplicitFlag[bool] = Field(False, alias="json")
    """Print the API's JSON instead of tables (for scripts)."""

    def _client(self) -> AdminClient:
        url = self.url or os.environ.get("OBLIVIATE_URL") or DEFAULT_URL
        token = self.token.get_secret_value() if self.token else None
        if token is None and self.token_file is not None:
            try:
                token = self.token_file.read_text().strip()
            except OSError as e:
                raise UsageError(f"cannot read --token-file: {e}") from e
        token = token or os.environ.get("OBLIVIATE_ADMIN_TOKEN") or None
        return AdminClient(url, token)

    def _run(self, body: Callable[[AdminClient, Output], int]) -> None:
        """Run `body` with a client; errors become a message on stderr and an exit code."""
        out = Output(json_mode=self.json_output)
        code = OK
        try:
            with self._client() as client:
                code = body(client, out)
        except UsageError as e:
            out.error(str(e))
            code = USAGE
        except AdminAPIError as e:
            out.error(str(e))
            code = FAILED
        except GatewayUnreachableError as e:
            out.error(f"{e} (set --url or OBLIVIATE_URL)")
            code = UNREACHABLE
        except WaitTimeoutError as e:
            out.error(str(e))
            code = TIMED_OUT
        if code != OK:
            raise SystemExit(code)


# --- add ------------------------------------------------------------------------------------


def _parse_option(item: str) -> tuple[str, Any]:
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise UsageError(f"--option {item!r}: give KEY=VALUE")
    try:
        value: Any = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip(), value


def load_target_file(path: Path) -> Json:
    """A target description from YAML or JSON (YAML is a superset; `.json` is parsed as JSON)."""
    import yaml

    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as e:
        raise UsageError(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise UsageError(f"{path}: expected a mapping with name, aliases, forget_examples, ...")
    if "examples" in data and "forget_examples" not in data:
        data["forget_examples"] = data.pop("examples")
    return data


class Add(_Connection):
    """Register a forget target from flags and/or a YAML or JSON file (flags win, lists add up)."""

    file: Path | None = None
    """YAML or JSON file: name, description, aliases, forget_examples, retain_examples, mode,
    options, scope."""
    name: str | None = None
    """The target's name."""
    description: str | None = None
    """What the target is (free text)."""
    alias: list[str] = []
    """A name the target goes by (repeatable)."""
    example: list[str] = []
    """A prompt about the target to forget (repeatable)."""
    retain: list[str] = []
    """A nearby prompt that must keep its answer (repeatable)."""
    mode: Literal["eco", "delta", "eco+delta"] | None = None
    """How to forget (default eco)."""
    fpr: float | None = None
    """False-positive rate the threshold is calibrated to (default 0.01)."""
    option: list[str] = []
    """Any other option as KEY=VALUE, VALUE as JSON when it parses (repeatable)."""
    tenant: list[str] = []
    """Apply the target only to this tenant (repeatable; sent as scope.tenants)."""
    api_key: list[str] = []
    """Apply the target only to requests with this API key (repeatable; scope.api_keys)."""
    wait: CliImplicitFlag[bool] = False
    """Follow the registration job until it ends (like `obliviate targets wait`)."""
    timeout: float | None = None
    """With --wait: give up after this many seconds (exit 4)."""

    def body(self) -> Json:
        """The POST /admin/targets body these flags and file describe."""
        data: Json = load_target_file(self.file) if self.file else {}
        for key, value in (("name", self.name), ("description", self.description)):
            if value is not None:
                data[key] = value
        if self.mode is not None:
            data["mode"] = self.mode
        for key, extra in (
            ("aliases", self.alias),
            ("forget_examples", self.example),
            ("retain_examples", self.retain),
        ):
            if extra:
                data[key] = [*(data.get(key) or []), *extra]
        options = dict(data.get("options") or {})
        if self.fpr is not None:
            options["fpr"] = self.fpr
        options.update(_parse_option(item) for item in self.option)
        if options:
            data["options"] = options
        scope = dict(data.get("scope") or {})
        for key, extra in (("tenants", self.tenant), ("api_keys", self.api_key)):
            if extra:
                scope[key] = [*(scope.get(key) or []), *extra]
        if scope:
            data["scope"] = scope
        if not data.get("name"):
            raise UsageError("give the target's name (--name, or `name:` in --file)")
        if not data.get("forget_examples"):
            raise UsageError("give at least one prompt to forget (--example, or forget_examples)")
        return data

    def cli_cmd(self) -> None:
        def run(client: AdminClient, out: Output) -> int:
            job = client.create_target(self.body())
            if not self.wait:
                out.job_queued(job)
                return OK
            out.note(f"Registering: job {job['id']}")
            return _follow(client, out, job["id"], self.timeout)

        self._run(run)


def _follow(client: AdminClient, out: Output, job_id: str, timeout: float | None) -> int:
    with out.job_progress() as update:
        job = client.wait_job(job_id, on_update=update, timeout_s=timeout)
    target = client.get_target(job["target_id"])
    out.job_done(job, target)
    return OK if job["status"] == "succeeded" else FAILED


# --- the other commands ---------------------------------------------------------------------


class ListTargets(_Connection):
    """List every target: status, mode, version, calibration figures."""

    def cli_cmd(self) -> None:
        def run(client: AdminClient, out: Output) -> int:
            out.targets(client.list_targets())
            return OK

        self._run(run)


class Show(_Connection):
    """Show one target (by id or name)."""

    target: CliPositionalArg[str]
    """The target's id or name."""

    def cli_cmd(self) -> None:
        def run(client: AdminClient, out: Output) -> int:
            target = client.resolve_target(self.target)
            out.target(target, client.list_jobs(target["id"], limit=5))
            return OK

        self._run(run)


class _Switch(_Connection):
    target: CliPositionalArg[str]
    """The target's id or name."""

    def _set(self, enabled: bool) -> None:
        def run(client: AdminClient, out: Output) -> int:
            target = client.resolve_target(self.target)
            out.changed(client.update_target(target["id"], {"enabled": enabled}))
            return OK

        self._run(run)


class Enable(_Switch):
    """Apply a target again."""

    def cli_cmd(self) -> None:
        self._set(True)


class Disable(_Switch):
    """Stop applying a target (kept, and enabled again at once with `enable`)."""

    def cli_cmd(self) -> None:
        self._set(False)


class Threshold(_Connection):
    """Override a target's threshold (a probability), or restore the calibrated one."""

    target: CliPositionalArg[str]
    """The target's id or name."""
    value: CliPositionalArg[str]
    """The new threshold, e.g. 0.95, or `calibrated` to restore the calibrated one."""

    def cli_cmd(self) -> None:
        def run(client: AdminClient, out: Output) -> int:
            if self.value.lower() in ("calibrated", "reset", "none"):
                threshold = None
            else:
                try:
                    threshold = float(self.value)
                except ValueError as e:
                    raise UsageError(f"{self.value!r} is not a number or `calibrated`") from e
            target = client.resolve_target(self.target)
            out.changed(client.update_target(target["id"], {"threshold": threshold}))
            return OK

        self._run(run)


class Remove(_Connection):
    """Delete a target: the gateway stops applying it at once."""

    target: CliPositionalArg[str]
    """The target's id or name."""
    yes: CliImplicitFlag[bool] = False
    """Do not ask for confirmation (needed when stdin is not a terminal)."""

    def cli_cmd(self) -> None:
        def run(client: AdminClient, out: Output) -> int:
            target = client.resolve_target(self.target)
            if not self.yes:
                if not sys.stdin.isatty():
                    raise UsageError("not a terminal: pass --yes to delete without asking")
                if not out.confirm(f"Delete target {target['name']!r} ({target['id']})?"):
                    out.note("Nothing deleted.")
                    return OK
            client.delete_target(target["id"])
            out.deleted(target)
            return OK

        self._run(run)


class Jobs(_Connection):
    """List registration jobs, newest first."""

    target: str | None = None
    """Only this target's jobs (id or name)."""
    limit: int = Field(20, ge=1, le=1000)
    """How many."""

    def cli_cmd(self) -> None:
        def run(client: AdminClient, out: Output) -> int:
            target_id = client.resolve_target(self.target)["id"] if self.target else None
            names = {t["id"]: t["name"] for t in client.list_targets()}
            out.jobs(client.list_jobs(target_id, self.limit), names)
            return OK

        self._run(run)


class Wait(_Connection):
    """Follow a registration job (stage and progress) until it ends; exit 1 if it failed."""

    job: CliPositionalArg[str]
    """The job id (`add` prints it)."""
    timeout: float | None = None
    """Give up after this many seconds (exit 4)."""

    def cli_cmd(self) -> None:
        self._run(lambda client, out: _follow(client, out, self.job, self.timeout))


class Classify(_Connection):
    """Dry run: which targets would flag a prompt, with the spans that would be corrupted."""

    prompt: CliPositionalArg[str]
    """The prompt; `-` reads stdin. `user:` / `assistant:` / `system:` lines, or a JSON list of
    messages, make it a conversation."""

    def cli_cmd(self) -> None:
        from server.console.views import parse_conversation

        def run(client: AdminClient, out: Output) -> int:
            text = sys.stdin.read() if self.prompt == "-" else self.prompt
            try:
                messages = parse_conversation(text)
            except ValueError as e:
                raise UsageError(str(e)) from e
            if len(messages) == 1 and messages[0]["role"] == "user":
                result = client.classify(prompt=messages[0]["content"])
            else:
                result = client.classify(messages=[dict(m) for m in messages])
            out.classification(result)
            return OK

        self._run(run)


class Targets(BaseModel):
    """Manage forget targets on a running gateway (its admin API)."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    add: CliSubCommand[Add]
    """Register a target (flags and/or a YAML/JSON file); --wait follows the job."""
    list: CliSubCommand[ListTargets]
    """Every target: status, mode, version, threshold, recall, false-positive rate."""
    show: CliSubCommand[Show]
    """One target in full (by id or name)."""
    enable: CliSubCommand[Enable]
    """Apply a target again."""
    disable: CliSubCommand[Disable]
    """Stop applying a target, keeping it."""
    threshold: CliSubCommand[Threshold]
    """Override a target's threshold, or restore the calibrated one."""
    rm: CliSubCommand[Remove]
    """Delete a target."""
    jobs: CliSubCommand[Jobs]
    """Registration jobs, newest first."""
    wait: CliSubCommand[Wait]
    """Follow a job with a progress bar until it ends."""
    classify: CliSubCommand[Classify]
    """Dry run of the guard on a prompt or conversation, spans highlighted."""

    def cli_cmd(self) -> None:
        CliApp.run_subcommand(self)


class _TargetsOnly(BaseSettings):
    """obliviate: an OpenAI-compatible gateway that makes a served LLM forget."""

    # The same `obliviate targets` as server.cli's, without importing the rest of the CLI.
    model_config = SettingsConfigDict(
        cli_prog_name="obliviate", cli_kebab_case=True, env_prefix="OBLIVIATE_CLI_"
    )

    targets: CliSubCommand[Targets]

    def cli_cmd(self) -> None:
        CliApp.run_subcommand(self)


def run(argv: list[str]) -> None:
    """`obliviate targets …` with `argv` starting at `targets`."""
    try:
        CliApp.run(_TargetsOnly, cli_args=argv)
    except ValidationError as e:  # a flag's value is wrong: say which, like argparse does
        for err in e.errors():
            where = "--" + str(err["loc"][-1]).replace("_", "-") if err["loc"] else "argument"
            sys.stderr.write(f"error: {where}: {err['msg']}\n")
        raise SystemExit(USAGE) from None
