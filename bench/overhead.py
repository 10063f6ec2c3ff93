"""Overhead of obliviate against vLLM's own OpenAI server, same model, same settings, one run.

Both servers run side by side. For each number of registered targets (0, 1, 20, 100 up to
`--targets N`), rounds alternate (vLLM, obliviate, obliviate flagged, vLLM, ...) so drift on the
machine hits every side. Each round sends `--concurrency` chat requests at once, none of them a
text of an earlier round (the guard's verdict cache would answer those; both servers get the
same ones), each generating exactly `--tokens` tokens greedily (min_tokens = max_tokens). For
every level it reports:

- unflagged throughput against vLLM's and the latency obliviate adds (p50, p99), and whether
  the greedy answers are byte-identical to vLLM's, beside vLLM's own answers to the last round
  sent again (under a burst, bf16 on AMX gives batch-dependent numerics: vLLM differs from
  itself there, and obliviate cannot be more identical than that);
- the guard's p50 / p99 per request under the burst (obliviate_guard_seconds, Prometheus'
  histogram_quantile over the unflagged rounds): the classifier call alone;
- admission p50 / p99 (obliviate_admission_seconds: from a request's arrival until its prompt
  goes to the engine, the wait for the event loop behind the burst included) and what the guard
  adds: to it, and, streamed, to the time to first token (what a client waits for), each
  round's p50 (median) minus that of a "bare" round on the same gateway with every target
  disabled (PATCH enabled=false: nothing classified), sent right before or after it (the order
  alternates), the median of those paired differences; and the throughput of the guarded
  rounds against the bare ones;
- flagged traffic (prompts about the Harry Potter target: corrupted prompt embeddings) against
  unflagged, on the same gateway;
- the resident memory of the gateway's process tree beyond vLLM server's (both trees hold one
  engine on the same model and KV cache size);
- the front end's CPU per request: the CPU time of each server's own process (every thread;
  the engine core is a child process on both sides) over each round, and obliviate's over the
  vLLM round before it, with the 95% interval of the median. On a machine whose cores vLLM
  keeps busy this is the cost that throughput shows only through its round-to-round noise.

The first target is the README's Harry Potter target, registered with default options (its
POST-to-live time and the job's stage timings are reported); the others come from
bench/targets.py (person targets of the shipped kind, corruption pinned, answers given).
Writes bench/results/overhead.json and overhead.md.

    python bench/overhead.py [--targets 100] [--rounds 3] [--concurrency 32] [--tokens 64]
                             [--stream] [--dtype float32|bfloat16] [--levels 20]

`--levels` measures only the numbers of targets given (registering up to the largest), so that
one level can run more rounds in the time the whole table takes: a 5-round ratio of one level
swings by +-5% on a 2-core machine, wider than the 2% the throughput goal allows.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.targets import (  # noqa: E402
    HARRY_POTTER,
    people,
    register,
    register_many,
    set_enabled,
    wait_idle,
)
from bench.workload import (  # noqa: E402
    Round,
    counter,
    cpu_seconds,
    flagged_prompts,
    histogram,
    histogram_delta,
    histogram_quantile,
    histogram_sum,
    interval,
    percentile,
    run_burst,
    side_by_side,
    tree_rss_mib,
    unflagged_prompts,
)
from offset.snap import native_bf16  # noqa: E402
from server.modelstore import resolve_model  # noqa: E402
from tests.e2e.servers import (  # noqa: E402
    ADMIN_TOKEN,
    MODEL_NAME,
)

LEVELS = (0, 1, 20, 100)
GUARD = "obliviate_guard_seconds"
ADMISSION = "obliviate_admission_seconds"
TIMED = (GUARD, ADMISSION)


def levels_up_to(n: int) -> list[int]:
    return sorted({level for level in LEVELS if level <= n} | {n})


def summary(rounds: list[Round]) -> dict[str, float]:
    lat = [x for r in rounds for x in r.latencies]
    out = {
        "tok_per_s_median": statistics.median(r.tok_per_s for r in rounds),
        "latency_p50_ms": 1000 * percentile(lat, 0.5),
        "latency_p99_ms": 1000 * percentile(lat, 0.99),
    }
    ttft = [x for r in rounds for x in r.ttft]
    if ttft:
        out["ttft_p50_ms"] = 1000 * percentile(ttft, 0.5)
    return out


def cpu_ratios(cpu: dict[str, list[float]]) -> list[float]:
    """obliviate's front-end CPU over vLLM's, round by round."""
    return [a / b for a, b in zip(cpu["obliviate"], cpu["vllm"], strict=True) if b > 0]


def register_up_to(url: str, have: int, want: int, report: dict[str, Any]) -> None:
    """Register targets `have`..`want`-1: Harry Potter first (default options), then people."""
    if have == 0 and want > 0:
        target = register(url, ADMIN_TOKEN, HARRY_POTTER)
        report["harry_potter"] = {
            "registration_s": target["registration_s"],
            "calibration": target.get("calibration"),
        }
        print(f"Harry Potter live {target['registration_s']:.1f} s after its POST", flush=True)
        have = 1
    if want > have:
        started = time.perf_counter()
        register_many(url, ADMIN_TOKEN, people(want - 1)[have - 1 :])
        seconds = time.perf_counter() - started
        report.setdefault("people_registration_s", []).append(
            {"targets": want - have, "seconds": seconds, "per_target_s": seconds / (want - have)}
        )
        print(f"{want - have} more targets in {seconds:.0f} s", flush=True)


def measure_level(
    urls: dict[str, str], pids: dict[str, int], targets: int, args: argparse.Namespace
) -> dict[str, Any]:
    """Alternated rounds at one number of targets."""
    # "bare": the same gateway with every target disabled, for what the guard adds in one
    # gateway (bare before guarded on even rounds, after on odd ones).
    sides = ["vllm", "obliviate"] + (["bare", "flagged"] if targets else [])
    rounds: dict[str, list[Round]] = {side: [] for side in sides}
    timed = {name: dict.fromkeys(histogram(urls["obliviate"], name), 0.0) for name in TIMED}
    admitted: dict[str, list[float]] = {"obliviate": [], "bare": []}  # p50 per round, s
    firsts: dict[str, list[float]] = {"obliviate": [], "bare": []}  # median TTFT, streamed, s
    # CPU seconds of the server's own process (all its threads; vLLM's engine core is a child
    # process on both sides) per round: what the front end costs, less noisy than throughput.
    cpu: dict[str, list[float]] = {side: [] for side in sides}
    guard_total_s = 0.0
    false_flags = 0.0
    identical = compared = 0
    last_vllm_prompts: list[str] = []
    for r in range(args.rounds):
        order = sides if r % 2 or not targets else ["vllm", "bare", "obliviate", "flagged"]
        for side in order:
            url = urls["vllm" if side == "vllm" else "obliviate"]
            if side == "bare":
                set_enabled(url, ADMIN_TOKEN, False)
                wait_idle(pids["obliviate"])  # as after enabling: nothing left from the switch
            before = {name: histogram(url, name) for name in TIMED} if side in admitted else {}
            sum_before = histogram_sum(url, GUARD) if side == "obliviate" else 0.0
            flags_before = (
                counter(url, "obliviate_guard_decisions", action="corrupt")
                if side == "obliviate"
                else 0.0
            )
            # Every round reads new texts (the guard's verdict cache would answer repeats);
            # both servers get the same ones, so their answers can be compared.
            # Bare rounds get texts of their own (the engine's prefix cache would serve the
            # guarded round's prompts again) of the same shape: the round's template, and a
            # suffix that differs (bench.workload._ask), so neither side has longer prompts.
            prompts = flagged_prompts if side == "flagged" else unflagged_prompts
            shape = 1000 + 16 * r + r % 8 + (8 if side == "bare" else 0)
            pid = pids["vllm" if side == "vllm" else "obliviate"]
            cpu_before = cpu_seconds(pid)[1]
            sent = prompts(args.concurrency, shape)
            result = run_burst(url, MODEL_NAME, sent, args.tokens, stream=args.stream)
            if side == "vllm":
                last_vllm_prompts = sent
            cpu[side].append(cpu_seconds(pid)[1] - cpu_before)
            rounds[side].append(result)
            if side in admitted:
                grew = {name: histogram_delta(before[name], histogram(url, name)) for name in TIMED}
                p50 = histogram_quantile(grew[ADMISSION], 0.5)
                admitted[side].append(p50 if p50 is not None else float("nan"))
                if result.ttft_median is not None:
                    firsts[side].append(result.ttft_median)
            if side == "bare":
                set_enabled(url, ADMIN_TOKEN, True)
                wait_idle(pids["obliviate"])  # the targets load again
            if side == "obliviate":
                for name, buckets in timed.items():
                    for le, n in grew[name].items():
                        buckets[le] = buckets.get(le, 0.0) + n
                guard_total_s += histogram_sum(url, GUARD) - sum_before
                false_flags += (
                    counter(url, "obliviate_guard_decisions", action="corrupt") - flags_before
                )
                vllm_texts = rounds["vllm"][-1].texts
                identical += sum(a == b for a, b in zip(result.texts, vllm_texts, strict=True))
                compared += len(vllm_texts)
            print(
                f"{targets:3d} targets, round {r + 1} {side:9s} {result.tok_per_s:6.1f} tok/s",
                flush=True,
            )
    # vLLM against itself on the last round's prompts: where batching changes the numerics
    # (bf16 matmuls on AMX), greedy answers under a burst differ between two runs of the same
    # server, and "identical to vLLM" can be no better than this.
    again = run_burst(urls["vllm"], MODEL_NAME, last_vllm_prompts, args.tokens, stream=args.stream)
    last = rounds["vllm"][-1].texts
    self_identical = sum(a == b for a, b in zip(again.texts, last, strict=True))
    ours, theirs = summary(rounds["obliviate"]), summary(rounds["vllm"])
    # Each obliviate round against the vLLM round just before it: the spread is the noise.
    round_ratios = [
        got.tok_per_s / base.tok_per_s
        for got, base in zip(rounds["obliviate"], rounds["vllm"], strict=True)
    ]
    cpu_ratio = cpu_ratios(cpu)
    level: dict[str, Any] = {
        "targets": targets,
        "vllm": theirs,
        "obliviate": ours,
        "throughput_ratio": ours["tok_per_s_median"] / theirs["tok_per_s_median"],
        "round_ratios": round_ratios,
        "round_ratio_median_interval": interval(round_ratios),
        "added_latency_p50_ms": ours["latency_p50_ms"] - theirs["latency_p50_ms"],
        # The front end's CPU per request (ms): each server's own process, every thread.
        "frontend_cpu_ms_per_request": {
            side: 1000 * statistics.median(v) / args.concurrency for side, v in cpu.items()
        },
        # Round by round (obliviate's over the vLLM round just before it), with the 95%
        # interval of the median.
        "frontend_cpu_ratio": statistics.median(cpu_ratio),
        "frontend_cpu_ratio_interval": interval(cpu_ratio),
        "added_latency_p99_ms": ours["latency_p99_ms"] - theirs["latency_p99_ms"],
        "greedy_identical": f"{identical}/{compared}",
        "vllm_self_identical": f"{self_identical}/{len(last)}",
        "unflagged_requests_flagged": false_flags,
    }
    guard = timed[GUARD]
    p50, p99 = histogram_quantile(guard, 0.5), histogram_quantile(guard, 0.99)
    if p50 is not None and p99 is not None:
        level.update(guard_p50_ms=1000 * p50, guard_p99_ms=1000 * p99)
        level["guarded_requests"] = guard[float("inf")]
        level["guard_mean_ms"] = 1000 * guard_total_s / max(1.0, guard[float("inf")])
    admission = timed[ADMISSION]
    p50, p99 = histogram_quantile(admission, 0.5), histogram_quantile(admission, 0.99)
    if p50 is not None and p99 is not None:
        level.update(admission_p50_ms=1000 * p50, admission_p99_ms=1000 * p99)
    if targets:
        paired = paired_ms(admitted)
        level["guard_adds_rounds_ms"] = paired
        level["guard_adds_p50_ms"] = statistics.median(paired)
        level["bare_admission_p50_ms"] = 1000 * statistics.median(admitted["bare"])
        if firsts["bare"]:
            # Streamed, what a client waits for: each round's median time to first token.
            paired = paired_ms(firsts)
            level["guard_adds_ttft_rounds_ms"] = paired
            level["guard_adds_ttft_p50_ms"] = statistics.median(paired)
        level["guarded_over_bare"] = statistics.median(
            got.tok_per_s / base.tok_per_s
            for got, base in zip(rounds["obliviate"], rounds["bare"], strict=True)
        )
        mine = summary(rounds["flagged"])
        level["flagged"] = mine
        level["flagged_over_unflagged"] = mine["tok_per_s_median"] / ours["tok_per_s_median"]
    own, tree = tree_rss_mib(pids["obliviate"])
    vllm_own, vllm_tree = tree_rss_mib(pids["vllm"])
    level["memory_mib"] = {
        "gateway_process": own,
        "gateway_tree": tree,
        "vllm_server_process": vllm_own,
        "vllm_server_tree": vllm_tree,
        "gateway_beyond_vllm": tree - vllm_tree,
    }
    return level


def paired_ms(seconds: dict[str, list[float]]) -> list[float]:
    """Round by round, the guarded round's figure less its bare round's, ms."""
    pairs = zip(seconds["obliviate"], seconds["bare"], strict=True)
    return [1000 * (guarded - bare) for guarded, bare in pairs]


def markdown(report: dict[str, Any]) -> str:
    rows = [
        "| targets | vLLM tok/s | obliviate tok/s | ratio (rounds min-max) | added p50 | added p99 "
        "| guard p50 | guard p99 | admission p50 | guard adds (p50): admission / first token "
        "| guarded / bare "
        "| flagged / unflagged | identical | vLLM vs itself | RSS beyond vLLM "
        "| front-end CPU per request, obliviate / vLLM (round ratio, 95% interval) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for lv in report["levels"]:
        flagged = f"{lv['flagged_over_unflagged']:.3f}" if "flagged_over_unflagged" in lv else "–"
        over_bare = f"{lv['guarded_over_bare']:.3f}" if "guarded_over_bare" in lv else "–"
        guard50 = f"{lv['guard_p50_ms']:.2f} ms" if "guard_p50_ms" in lv else "–"
        guard99 = f"{lv['guard_p99_ms']:.2f} ms" if "guard_p99_ms" in lv else "–"
        admitted = f"{lv['admission_p50_ms']:.1f} ms" if "admission_p50_ms" in lv else "–"
        cpu = lv["frontend_cpu_ms_per_request"]
        low, high = lv["frontend_cpu_ratio_interval"]
        adds = (
            f"{lv['guard_adds_p50_ms']:+.1f} / "
            + (f"{lv['guard_adds_ttft_p50_ms']:+.1f}" if "guard_adds_ttft_p50_ms" in lv else "–")
            + " ms"
            if lv["targets"] and "guard_adds_p50_ms" in lv
            else "–"
        )
        rows.append(
            f"| {lv['targets']} | {lv['vllm']['tok_per_s_median']:.1f} "
            f"| {lv['obliviate']['tok_per_s_median']:.1f} | {lv['throughput_ratio']:.3f} "
            f"({min(lv['round_ratios']):.2f}-{max(lv['round_ratios']):.2f}) "
            f"| {lv['added_latency_p50_ms']:+.0f} ms | {lv['added_latency_p99_ms']:+.0f} ms "
            f"| {guard50} | {guard99} | {admitted} | {adds} | {over_bare} | {flagged} "
            f"| {lv['greedy_identical']} "
            f"| {lv.get('vllm_self_identical', '–')} "
            f"| {lv['memory_mib']['gateway_beyond_vllm']:+.0f} MiB "
            f"| {cpu['obliviate']:.2f} / {cpu['vllm']:.2f} ms ({lv['frontend_cpu_ratio']:.2f}, "
            f"{low:.2f}-{high:.2f}) |"
        )
    return "\n".join(rows) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--targets", type=int, default=100, help="largest number of targets")
    parser.add_argument(
        "--levels", type=int, nargs="+", help="only these numbers of targets (each <= --targets)"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--stream", action="store_true", help="streamed requests (SSE)")
    # Emulated bf16 (CPUs without avx512_bf16/amx_bf16) is several times slower than float32.
    parser.add_argument("--dtype", default="bfloat16" if native_bf16() else "float32")
    parser.add_argument("--out", type=Path, default=Path("bench/results/overhead.json"))
    args = parser.parse_args()
    levels = levels_up_to(args.targets) if not args.levels else sorted(set(args.levels))
    if levels[0] < 0 or levels[-1] > args.targets:
        parser.error(f"--levels must be between 0 and --targets ({args.targets})")

    model = resolve_model(None, auto_pull=True)
    logs = Path(tempfile.mkdtemp(prefix="obliviate-bench-"))
    report: dict[str, Any] = {
        "workload": {
            "concurrency": args.concurrency, "tokens": args.tokens, "rounds": args.rounds,
            "levels": levels,
            "stream": args.stream, "dtype": args.dtype, "model": MODEL_NAME,
            "cpus": os.cpu_count(), "load_average_at_start": os.getloadavg(),
        },
        "levels": [],
    }  # fmt: skip
    with side_by_side(model, args.dtype, logs) as (urls, pids):
        report["waited_for_idle_s"] = wait_idle(pids["obliviate"])
        report["memory_at_start_mib"] = {
            "gateway_tree": tree_rss_mib(pids["obliviate"])[1],
            "vllm_server_tree": tree_rss_mib(pids["vllm"])[1],
        }
        # Warm-up: a full burst each, untimed. The first bursts pay one-off costs (the gateway's
        # first two 32-request rounds ran ~12% slower than its later ones after a 4-request
        # warm-up, and counted in the medians).
        for url in urls.values():
            run_burst(url, MODEL_NAME, unflagged_prompts(4), 8, stream=args.stream)
            run_burst(
                url, MODEL_NAME, unflagged_prompts(args.concurrency), args.tokens,
                stream=args.stream,
            )  # fmt: skip
        have = 0
        for targets in levels:
            register_up_to(urls["obliviate"], have, targets, report)
            if have == 0 and targets > 0:
                report["memory_after_first_registration_mib"] = tree_rss_mib(pids["obliviate"])[1]
            have = targets
            wait_idle(pids["obliviate"])
            level = measure_level(urls, pids, targets, args)
            report["levels"].append(level)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=2, default=str))
    table = markdown(report)
    args.out.with_suffix(".md").write_text(table)
    print(json.dumps(report, indent=2, default=str))
    print(table)


if __name__ == "__main__":
    main()
