"""bench/guard_cost.py in its smoke form: 2 targets, 2 pairs of bursts of 4, on the real engine.

The figure the bench reports (what the guard adds to admission) is only what it says if the
bare bursts are read by no classifier and each guarded request is read once, on both gateways
of a side-by-side run, and if `--against-args` reaches the second gateway. The timings
themselves are the benchmark's to show (docs/results/performance.md), not this test's.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from tests.e2e.bench_runs import run_bench

PAIRS, CONCURRENCY = 2, 4


def test_guard_cost_reads_only_the_guarded_bursts_on_both_gateways(tmp_path: Path) -> None:
    out = tmp_path / "guard_cost.json"
    run_bench(
        "guard_cost.py",
        "--targets", "2", "--pairs", str(PAIRS), "--concurrency", str(CONCURRENCY),
        "--stream",  # the client's time to first token is read on streamed bursts
        # The second gateway reads every prompt on the guard's thread, none on the loop.
        "--against-args", "--guard.loop-chars 0",
        "--out", str(out),
    )  # fmt: skip
    report = json.loads(out.read_text())
    guarded = PAIRS * CONCURRENCY
    this, other = report, report["against"]
    for side in (this, other):
        assert len(side["pairs"]) == PAIRS
        # The guard's histogram grew by the guarded bursts' requests only.
        assert side["guarded_requests"] == guarded
        for pair in side["pairs"]:
            assert pair["bare"]["reads"] == {"loop": 0.0, "thread": 0.0}
            ttft = pair["guarded"]["ttft_p50_ms"] - pair["bare"]["ttft_p50_ms"]
            assert pair["adds_ttft_p50_ms"] == ttft > -pair["bare"]["ttft_p50_ms"]
    # Every prompt, and the output guard's read of every answer, on the loop for one gateway
    # and on the guard's thread for the other.
    assert this["reads"]["thread"] == 0 and this["reads"]["loop"] >= guarded
    assert other["reads"]["loop"] == 0 and other["reads"]["thread"] >= guarded
    diffs = [
        a["adds_p50_ms"] - b["adds_p50_ms"]
        for a, b in zip(this["pairs"], other["pairs"], strict=True)
    ]
    assert report["difference_p50_ms"] == statistics.median(diffs)
    ttft = [
        a["guarded"]["ttft_p50_ms"] - b["guarded"]["ttft_p50_ms"]
        for a, b in zip(this["pairs"], other["pairs"], strict=True)
    ]
    assert report["difference_guarded_ttft_ms"] == statistics.median(ttft)
    low, high = report["difference_p50_interval_ms"]
    assert low <= report["difference_p50_ms"] <= high
