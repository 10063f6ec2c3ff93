"""bench/overhead.py (`make bench`) in its smoke form: vLLM's own server and the gateway side by
side, 0 and 1 target, 2 rounds of 4 streamed requests, on the real engine.

The figures it reports are only what they say if each comes from the rounds it names: the
throughput ratio from the two servers' rounds, what the guard adds from guarded rounds paired
with bare ones, the guard's histogram from the guarded rounds alone, and no unflagged prompt of
the workload flagged. The timings themselves are the benchmark's to show
(docs/results/performance.md), not this test's.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from tests.e2e.bench_runs import run_bench

ROUNDS, CONCURRENCY = 2, 4


def test_overhead_reports_each_level_from_its_own_rounds(tmp_path: Path) -> None:
    out = tmp_path / "overhead.json"
    run_bench(
        "overhead.py",
        "--targets", "1", "--levels", "0", "1",
        "--rounds", str(ROUNDS), "--concurrency", str(CONCURRENCY), "--tokens", "4",
        "--stream", "--out", str(out),
        timeout=1200,
    )  # fmt: skip
    report = json.loads(out.read_text())
    assert [level["targets"] for level in report["levels"]] == [0, 1]
    for level in report["levels"]:
        assert len(level["round_ratios"]) == ROUNDS
        ours, theirs = level["obliviate"], level["vllm"]
        assert level["throughput_ratio"] == ours["tok_per_s_median"] / theirs["tok_per_s_median"]
        low, high = level["round_ratio_median_interval"]
        assert low <= statistics.median(level["round_ratios"]) <= high
        # Every answer of the gateway's rounds compared with vLLM's answer to the same prompt.
        assert level["greedy_identical"].endswith(f"/{ROUNDS * CONCURRENCY}")
        assert level["unflagged_requests_flagged"] == 0
        assert set(level["memory_mib"]) >= {"gateway_tree", "vllm_server_tree"}
    none, one = report["levels"]
    assert "guard_p50_ms" not in none and "flagged" not in none  # nothing to classify
    # The guard's histogram grew by the guarded unflagged rounds' requests, once each.
    assert one["guarded_requests"] == ROUNDS * CONCURRENCY
    assert one["guard_adds_p50_ms"] == statistics.median(one["guard_adds_rounds_ms"])
    assert len(one["guard_adds_ttft_rounds_ms"]) == ROUNDS  # streamed: time to first token
    assert one["guard_adds_ttft_p50_ms"] == statistics.median(one["guard_adds_ttft_rounds_ms"])
    assert one["flagged_over_unflagged"] > 0
    assert out.with_suffix(".md").read_text().count("\n") == 2 + len(report["levels"])
