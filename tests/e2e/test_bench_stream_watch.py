"""bench/stream_watch.py in its smoke form: what it times is the watch of new answers that name
no target, each released whole, as the bare stream gives them. The timings are the benchmark's to
show (docs/results/performance.md), not this test's."""

from __future__ import annotations

from tests.e2e.bench_runs import run_bench


def test_stream_watch_times_answers_the_watch_releases_whole() -> None:
    out = run_bench(
        "stream_watch.py", "--targets", "3", "--concurrency", "4", "--repeats", "1", timeout=300
    )
    lines = out.splitlines()
    assert sum(line.startswith("watched  3 targets") for line in lines) == 1
    assert "watched answers released as generated: yes" in lines
