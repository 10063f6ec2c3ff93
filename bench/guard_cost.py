"""What the guard adds to a request's admission under a burst, in one gateway, in pairs.

    python bench/guard_cost.py [--targets 20] [--pairs 30] [--concurrency 32] [--tokens 4]
                               [--stream] [--dtype float32|bfloat16] [--gateway-args "..."]
                               [--against WORKTREE] [--against-args "..."]

bench/overhead.py compares whole rounds, a few per level, and on a shared 2-core machine one
round's admission p50 moves by 10-20 ms from the next; that buries a guard cost of a few ms.
This runs one `obliviate serve` (no vLLM server beside it), registers the README's Harry Potter
target and people up to `--targets` (bench/targets.py), then sends `--pairs` pairs of bursts:
in each pair, one burst with every target disabled (PATCH enabled=false: nothing classified,
as with no target) and one with every target enabled (each prompt classified), the order
alternating from pair to pair. A burst is `--concurrency` new unflagged chat requests sent at
once (bench/workload.py; no text twice, so neither the verdict cache nor the engine's prefix
cache answers), each generating `--tokens` tokens: short, as admission ends when the prompt goes
to the engine and the burst's arrivals are what load the event loop then.

Per burst it reads obliviate_admission_seconds (arrival until the prompt goes to the engine),
the client's time to each first token when streamed (what a client waits for: admission, then
the engine's prefill, which on this CPU takes seconds behind a burst), and, for the guarded
ones, obliviate_guard_seconds. It reports the median of the pairs' differences in admission p50
(guarded - bare) with a 95% bootstrap interval, the same for the p90 and for the burst's median
time to first token, the guard's p50 / p99 over every guarded request, and the CPU time the
gateway's event loop (its main thread) and its whole process used per burst on each side
(/proc; the counters tick every 10 ms, so only the mean over many bursts means anything).
Writes bench/results/guard_cost.json.

From one run to the next on this 2-core machine the figure moves by 2-3 ms, more than a change
to the guard's code often makes. `--against WORKTREE` (e.g. `git worktree add /tmp/before
HEAD~1`) runs a second gateway on that checkout's code beside this one, with the same targets:
each pair of bursts goes to both gateways, one after the other (their order alternating), with
the same prompts, and the report adds the median of the pairs' differences (this - against)
with its 95% interval: the drift between runs reaches both sides of each pair alike.
`--against-args "--guard.loop-batch 1"` gives the second gateway other flags (instead of
`--gateway-args`); without `--against` it runs this checkout's code: two settings side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.targets import serving, set_enabled, wait_idle  # noqa: E402
from bench.workload import (  # noqa: E402
    counter,
    cpu_seconds,
    histogram,
    histogram_delta,
    histogram_quantile,
    interval,
    run_burst,
    unflagged_prompts,
)
from offset.snap import native_bf16  # noqa: E402
from tests.e2e.servers import ADMIN_TOKEN, MODEL_NAME  # noqa: E402

ADMISSION = "obliviate_admission_seconds"
GUARD = "obliviate_guard_seconds"
READS = "obliviate_guard_reads"  # texts read on the event loop / on the guard's thread


def burst_quantiles(
    url: str, prompts: list[str], args: argparse.Namespace, pid: int
) -> dict[str, Any]:
    """One burst; its admission p50 / p90 (ms), the client's median time to first token
    (streamed), the guard histogram's change and the CPU the gateway's event loop and process
    used from its start to its end."""
    before = {name: histogram(url, name) for name in (ADMISSION, GUARD)}
    reads = {path: counter(url, READS, path=path) for path in ("loop", "thread")}
    cpu = cpu_seconds(pid)
    done = run_burst(url, MODEL_NAME, prompts, args.tokens, stream=args.stream)
    loop_s, process_s = (after - start for after, start in zip(cpu_seconds(pid), cpu, strict=True))
    after = {name: histogram(url, name) for name in (ADMISSION, GUARD)}
    reads = {path: counter(url, READS, path=path) - n for path, n in reads.items()}
    admission = histogram_delta(before[ADMISSION], after[ADMISSION])
    p50, p90 = histogram_quantile(admission, 0.5), histogram_quantile(admission, 0.9)
    if p50 is None or p90 is None or admission[float("inf")] != len(prompts):
        raise RuntimeError(f"admission not observed for every prompt: {admission}")
    return {
        "p50_ms": 1000 * p50,
        "p90_ms": 1000 * p90,
        "ttft_p50_ms": None if done.ttft_median is None else 1000 * done.ttft_median,
        "guard": histogram_delta(before[GUARD], after[GUARD]),
        "reads": reads,
        "loop_cpu_ms": 1000 * loop_s,
        "process_cpu_ms": 1000 * process_s,
    }


def summary(pairs: list[dict[str, Any]], guard: dict[float, float]) -> dict[str, Any]:
    """One gateway's figures over its pairs of bursts (and its guard histogram's counts)."""
    adds50 = [p["adds_p50_ms"] for p in pairs]
    adds90 = [p["adds_p90_ms"] for p in pairs]
    ttft = [p["adds_ttft_p50_ms"] for p in pairs if p["adds_ttft_p50_ms"] is not None]
    guard_p50, guard_p99 = histogram_quantile(guard, 0.5), histogram_quantile(guard, 0.99)
    return {
        "pairs": pairs,
        "guard_adds_p50_ms": statistics.median(adds50),
        "guard_adds_p50_interval_ms": interval(adds50),
        "guard_adds_p90_ms": statistics.median(adds90),
        "guard_adds_p90_interval_ms": interval(adds90),
        # What a client waits for (streamed): the burst's median time to first token.
        "guard_adds_ttft_p50_ms": statistics.median(ttft) if ttft else None,
        "guard_adds_ttft_p50_interval_ms": interval(ttft) if ttft else None,
        "bare_ttft_p50_ms": statistics.median(p["bare"]["ttft_p50_ms"] for p in pairs)
        if ttft
        else None,
        "guarded_ttft_p50_ms": statistics.median(p["guarded"]["ttft_p50_ms"] for p in pairs)
        if ttft
        else None,
        "bare_admission_p50_ms": statistics.median(p["bare"]["p50_ms"] for p in pairs),
        "guarded_admission_p50_ms": statistics.median(p["guarded"]["p50_ms"] for p in pairs),
        "guard_p50_ms": 1000 * guard_p50 if guard_p50 is not None else None,
        "guard_p99_ms": 1000 * guard_p99 if guard_p99 is not None else None,
        "guarded_requests": guard.get(float("inf"), 0.0),
        "reads": {
            path: sum(p["guarded"]["reads"][path] for p in pairs) for path in ("loop", "thread")
        },
        # Mean over the bursts (the /proc counters tick every 10 ms): what a burst costs the
        # gateway's event loop, and its whole process, with every target disabled or enabled.
        "cpu_ms_per_burst": {
            side: {
                what: statistics.fmean(p[side][f"{what}_cpu_ms"] for p in pairs)
                for what in ("loop", "process")
            }
            for side in ("bare", "guarded")
        },
    }


def show(name: str, args: argparse.Namespace, report: dict[str, Any]) -> None:
    low, high = report["guard_adds_p50_interval_ms"]
    print(
        f"{name}: {args.targets} targets, {args.pairs} pairs of {args.concurrency} requests: the "
        f"guard adds {report['guard_adds_p50_ms']:+.1f} ms to admission p50 (95% interval "
        f"{low:+.1f} to {high:+.1f}); p90 {report['guard_adds_p90_ms']:+.1f} ms; guard p50 / p99 "
        f"{report['guard_p50_ms']:.1f} / {report['guard_p99_ms']:.1f} ms"
    )
    if report["guard_adds_ttft_p50_ms"] is not None:
        low, high = report["guard_adds_ttft_p50_interval_ms"]
        print(
            f"{name}: the guard adds {report['guard_adds_ttft_p50_ms']:+.1f} ms to the burst's "
            f"median time to first token (95% interval {low:+.1f} to {high:+.1f}; bare / "
            f"guarded {report['bare_ttft_p50_ms']:.1f} / {report['guarded_ttft_p50_ms']:.1f} ms)"
        )
    cpu = report["cpu_ms_per_burst"]
    print(
        f"{name}: CPU per burst, event loop / whole gateway: bare "
        f"{cpu['bare']['loop']:.0f} / {cpu['bare']['process']:.0f} ms, guarded "
        f"{cpu['guarded']['loop']:.0f} / {cpu['guarded']['process']:.0f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--targets", type=int, default=20)
    parser.add_argument("--pairs", type=int, default=30)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=4)
    parser.add_argument("--stream", action="store_true", help="streamed requests (SSE)")
    parser.add_argument("--dtype", default="bfloat16" if native_bf16() else "float32")
    parser.add_argument(
        "--gateway-args",
        default="",
        help='more `obliviate serve` flags, e.g. "--guard.loop-chars 0"',
    )
    parser.add_argument(
        "--against",
        type=Path,
        help="another checkout (a worktree of another commit): a second gateway runs its code "
        "beside this one, the same bursts go to both, and the report adds the difference",
    )
    parser.add_argument(
        "--against-args",
        help="the second gateway's `obliviate serve` flags instead of --gateway-args; without "
        "--against, the second gateway runs this checkout with them",
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results/guard_cost.json"))
    args = parser.parse_args()
    if args.targets < 1 or args.pairs < 2:
        parser.error("give --targets >= 1 and --pairs >= 2")
    if args.against is not None and not (args.against / "server" / "__main__.py").is_file():
        parser.error(f"--against {args.against}: not a checkout of this project")

    report: dict[str, Any] = {"workload": {**vars(args), "out": str(args.out)}}
    report["workload"].update(
        against=str(args.against) if args.against else None,
        against_args=args.against_args,
        cpus=os.cpu_count(),
        load_average_at_start=os.getloadavg(),
    )
    extra = shlex.split(args.gateway_args)
    # name -> (checkout, flags); None: this checkout
    gateways: dict[str, tuple[Path | None, list[str]]] = {"this": (None, extra)}
    if args.against is not None or args.against_args is not None:
        other = extra if args.against_args is None else shlex.split(args.against_args)
        gateways["against"] = (args.against, other)
    with ExitStack() as stack:
        served = {
            name: stack.enter_context(
                serving(args.targets, dtype=args.dtype, extra=flags, code=code)
            )
            for name, (code, flags) in gateways.items()
        }
        for url, _ in served.values():
            run_burst(url, MODEL_NAME, unflagged_prompts(args.concurrency), 8, stream=args.stream)
        pairs: dict[str, list[dict[str, Any]]] = {name: [] for name in served}
        guard: dict[str, dict[float, float]] = {name: {} for name in served}
        for i in range(args.pairs):
            # Gateways in turn (their order alternating every two pairs), each a pair of bursts
            # (bare and guarded, the order alternating every pair); the same prompts to both.
            names = list(served) if (i // 2) % 2 == 0 else list(reversed(served))
            for name in names:
                url, pid = served[name]
                pair: dict[str, Any] = {}
                for side in ("bare", "guarded") if i % 2 == 0 else ("guarded", "bare"):
                    set_enabled(url, ADMIN_TOKEN, side == "guarded")
                    wait_idle(pid)  # enabling loads the targets again
                    # New texts for each burst: 2 per pair, far from bench/overhead.py's rounds.
                    prompts = unflagged_prompts(args.concurrency, 10_000 + 2 * i + (side == "bare"))
                    got = burst_quantiles(url, prompts, args, pid)
                    for le, n in got.pop("guard").items():
                        guard[name][le] = guard[name].get(le, 0.0) + n
                    pair[side] = got
                pair["adds_p50_ms"] = pair["guarded"]["p50_ms"] - pair["bare"]["p50_ms"]
                pair["adds_p90_ms"] = pair["guarded"]["p90_ms"] - pair["bare"]["p90_ms"]
                ttft = pair["guarded"]["ttft_p50_ms"], pair["bare"]["ttft_p50_ms"]
                pair["adds_ttft_p50_ms"] = None if None in ttft else ttft[0] - ttft[1]
                pairs[name].append(pair)
                print(
                    f"pair {i + 1:3d} {name:7s}: bare p50 {pair['bare']['p50_ms']:6.1f} ms, "
                    f"guarded {pair['guarded']['p50_ms']:6.1f} ms, "
                    f"adds {pair['adds_p50_ms']:+6.1f} ms"
                    + (
                        f"; first token {pair['adds_ttft_p50_ms']:+6.1f} ms"
                        if pair["adds_ttft_p50_ms"] is not None
                        else ""
                    ),
                    flush=True,
                )
    report.update(summary(pairs["this"], guard["this"]))
    show("this", args, report)
    if "against" in served:
        report["against"] = summary(pairs["against"], guard["against"])
        show("against", args, report["against"])
        # Pair by pair: what this code's guard adds less what the other's adds.
        diff = [
            a["adds_p50_ms"] - b["adds_p50_ms"]
            for a, b in zip(pairs["this"], pairs["against"], strict=True)
        ]
        report["difference_p50_ms"] = statistics.median(diff)
        report["difference_p50_interval_ms"] = interval(diff)
        low, high = report["difference_p50_interval_ms"]
        print(
            f"this - against, guard adds at the p50: {report['difference_p50_ms']:+.1f} ms "
            f"(95% interval {low:+.1f} to {high:+.1f})"
        )
        if args.stream:
            # Pair by pair, the bursts' median time to first token: this less the other
            # gateway (both guarded, the same prompts), and the same for the bare bursts.
            for side in ("guarded", "bare"):
                diff = [
                    a[side]["ttft_p50_ms"] - b[side]["ttft_p50_ms"]
                    for a, b in zip(pairs["this"], pairs["against"], strict=True)
                ]
                report[f"difference_{side}_ttft_ms"] = statistics.median(diff)
                report[f"difference_{side}_ttft_interval_ms"] = interval(diff)
                low, high = report[f"difference_{side}_ttft_interval_ms"]
                print(
                    f"this - against, {side} bursts' median time to first token: "
                    f"{report[f'difference_{side}_ttft_ms']:+.1f} ms "
                    f"(95% interval {low:+.1f} to {high:+.1f})"
                )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
