"""`python -m server`: `targets` starts fast, everything else loads the gateway's command line.

`targets …` is a thin client of a gateway's admin API; importing the full command line
(`server.cli`) would import torch first, seconds per command.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    """Entry point of `python -m server`."""
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["targets"]:
        from server.cli_targets import run

        run(args)
        return
    from server.cli import main as full

    full(args)
