"""Running a benchmark script in its smoke form, as `make bench` would, for the bench tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_bench(script: str, *args: str, timeout: int = 900) -> str:
    """`python bench/<script> <args>` from the repository root; its stdout (it must succeed)."""
    run = subprocess.run(
        [sys.executable, f"bench/{script}", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run.stdout
