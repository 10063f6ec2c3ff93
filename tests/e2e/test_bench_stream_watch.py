"""bench/stream_watch.py in its smoke form: what it times is the watch of new answers that name
no target, each released whole, as the bare stream gives them. The timings are the benchmark's to
show (docs/results/performance.md), not this test's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_stream_watch_times_answers_the_watch_releases_whole() -> None:
    run = subprocess.run(
        [sys.executable, "bench/stream_watch.py", "--targets", "3", "--concurrency", "4",
         "--repeats", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    assert sum(line.startswith("watched  3 targets") for line in lines) == 1
    assert "watched answers released as generated: yes" in lines
