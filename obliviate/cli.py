"""`obliviate`: serve, targets, models pull / list, doctor, snap (the gateway's) and eval.

`obliviate targets …` is a thin client of a gateway's admin API and starts fast: importing the
full command line would import torch and the evaluation stack first, seconds per command.
"""

from __future__ import annotations

import sys

from pydantic_settings import BaseSettings, CliApp, CliSubCommand, SettingsConfigDict


def _full_cli() -> type[BaseSettings]:
    from pydantic import BaseModel, ConfigDict

    from evaluation.cli import TofuCommand
    from server.cli import Doctor, Models, Serve, Snap
    from server.cli_targets import Targets

    class Eval(BaseModel):
        """Efficacy evaluations (TOFU)."""

        model_config = ConfigDict(use_attribute_docstrings=True)

        tofu: CliSubCommand[TofuCommand]

        def cli_cmd(self) -> None:
            CliApp.run_subcommand(self)

    class Obliviate(BaseSettings):
        """obliviate: an OpenAI-compatible gateway that makes a served LLM forget."""

        model_config = SettingsConfigDict(cli_prog_name="obliviate", cli_kebab_case=True)

        serve: CliSubCommand[Serve]
        targets: CliSubCommand[Targets]
        models: CliSubCommand[Models]
        eval: CliSubCommand[Eval]
        doctor: CliSubCommand[Doctor]
        snap: CliSubCommand[Snap]

        def cli_cmd(self) -> None:
            CliApp.run_subcommand(self)

    return Obliviate


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `obliviate` console script and `python -m obliviate`."""
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["targets"]:
        from server.cli_targets import run

        run(args)
        return
    CliApp.run(_full_cli(), cli_args=args)
