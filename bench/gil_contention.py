"""The guard's classifier batch while another thread wants the GIL, as the event loop does
under a burst.

    .venv/bin/python bench/gil_contention.py [--targets 20] [--repeats 30]
                                             [--intervals 5 1 0.5] [--profile]

The guard classifies on a thread of its own (server.services.batching). Every time NumPy, torch
or the tokenizer lets go of the GIL inside a batch, the guard's thread must take it back from
the event loop; while the loop is busy, each hand-back waits up to the interpreter's switch
interval (`sys.setswitchinterval`, 5 ms by default). This times `classify_groups` on a batch of
32 new unflagged prompts (bench/workload.py; the bank's cache off) at 20 targets with no other
thread, beside a thread running Python without pause (the worst case), and beside one busy
half the time (2 ms on, 2 ms off), for each switch interval given (ms). `--profile` prints
cProfile's top calls by own time for the busy case at the first interval: the calls that let go
of the GIL show up with milliseconds each.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
from threadpoolctl import threadpool_limits

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.classifier_scaling import as_guard, make_bank, specs, trained  # noqa: E402
from bench.workload import unflagged_prompts  # noqa: E402
from classifier import Embedder  # noqa: E402

BURST = 32
PAYLOAD = {"messages": [{"role": "user", "content": "x" * 200}] * 4, "n": list(range(50))}


def python_work(stop: threading.Event, on_s: float, off_s: float) -> None:
    """Pure-Python work (JSON, as a request handler does) for `on_s`, then sleep `off_s`."""
    while not stop.is_set():
        until = time.perf_counter() + on_s
        while time.perf_counter() < until:
            json.loads(json.dumps(PAYLOAD))
        if off_s:
            time.sleep(off_s)


def timed(call: Callable[[list[list[str]]], object], repeats: int, load: str) -> list[float]:
    """Milliseconds per batch of `repeats` batches of new prompts, beside `load`."""
    stop = threading.Event()
    duty = {"none": None, "busy": (1.0, 0.0), "half": (0.002, 0.002)}[load]
    other = threading.Thread(target=python_work, args=(stop, *duty)) if duty else None
    if other:
        other.start()
    walls = []
    try:
        for r in range(repeats):
            groups = [[p] for p in unflagged_prompts(BURST, 1000 + r)]
            t0 = time.perf_counter()
            call(groups)
            walls.append((time.perf_counter() - t0) * 1e3)
    finally:
        stop.set()
        if other:
            other.join()
    return walls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--targets", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--intervals", type=float, nargs="+", default=[5.0, 1.0, 0.5])
    parser.add_argument("--cache", type=Path, default=ROOT / ".obliviate" / "bench-targets")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()

    torch.set_num_threads(1)  # as the gateway runs the guard (server.deps.build_guard)
    threadpool_limits(1, user_api="blas")
    embedder = Embedder()
    targets = [trained(s, embedder, args.cache) for s in specs(args.targets)]
    call = as_guard(make_bank(embedder, targets, cache=False))
    call([[p] for p in unflagged_prompts(BURST)])  # warm-up

    if args.profile:
        sys.setswitchinterval(args.intervals[0] / 1e3)
        profiler = cProfile.Profile()
        profiler.enable()
        timed(call, 5, "busy")
        profiler.disable()
        stats = pstats.Stats(profiler).sort_stats("tottime")
        stats.print_stats(15)
        stats.print_callers("acquire")
        return

    print(f"batch of {BURST} new prompts, {args.targets} targets, ms per batch")
    print("| switch interval | other thread | p50 | p99 |")
    print("|---:|---|---:|---:|")
    for interval in args.intervals:
        sys.setswitchinterval(interval / 1e3)
        for load in ("none", "busy", "half"):
            walls = timed(call, args.repeats, load)
            p99 = sorted(walls)[min(len(walls) - 1, round(0.99 * (len(walls) - 1)))]
            print(
                f"| {interval:g} ms | {load} | {statistics.median(walls):.2f} | {p99:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
