"""What the guard's read of a burst costs the event loop, in one process: no engine, no HTTP.

    .venv/bin/python bench/protect_loop.py [--targets 20] [--rounds 40] [--concurrency 32]
                                           [--profile]

Under a burst the gateway's event loop runs every request's `EcoGuard.protect`: the static
stage on short prompts (server.services.batching.LoopBatcher), and the bookkeeping around it.
On the 2-core machine vLLM keeps both cores busy, so each millisecond of it here becomes
several of admission there (bench/guard_cost.py measures that, through HTTP, with the engine).
This builds the guard as the gateway does (`EcoGuard`, its bank with the verdict cache) over
the README's Harry Potter target and people up to `--targets` (trained with the registration's
default config, cached like bench/classifier_scaling.py's), then runs `--rounds` bursts of
`--concurrency` concurrent `protect` calls on new unflagged chat prompts (bench/workload.py; no
text twice, so the verdict cache never answers) and prints the CPU time of a burst (p50 and p90
over the rounds; one torch and one BLAS thread, as the gateway runs the guard). `--profile`:
cProfile of the rounds instead, top 25 by own time.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import sys
import time
from pathlib import Path

import torch
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.classifier_scaling import ROOT, specs, trained  # noqa: E402
from bench.workload import percentile, unflagged_prompts  # noqa: E402
from classifier import ClassifierBank, Embedder  # noqa: E402
from server.engine import ChatPrompt  # noqa: E402
from server.metrics import Metrics  # noqa: E402
from server.services.guard import ActiveTarget, EcoGuard  # noqa: E402


async def burst(guard: EcoGuard, prompts: list[str]) -> None:
    await asyncio.gather(
        *(
            guard.protect(ChatPrompt(messages=({"role": "user", "content": p},)), f"r{i}")
            for i, p in enumerate(prompts)
        )
    )


async def rounds(guard: EcoGuard, args: argparse.Namespace) -> list[float]:
    """CPU ms of each burst (after one to warm up)."""
    await burst(guard, unflagged_prompts(args.concurrency, 90_000))
    out = []
    for r in range(args.rounds):
        prompts = unflagged_prompts(args.concurrency, 100_000 + r)
        start = time.process_time()
        await burst(guard, prompts)
        out.append(1000 * (time.process_time() - start))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--targets", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--cache", type=Path, default=ROOT / ".obliviate" / "bench-targets")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()

    torch.set_num_threads(1)
    threadpool_limits(1, user_api="blas")
    embedder = Embedder()
    targets = [trained(s, embedder, args.cache) for s in specs(args.targets)]
    guard = EcoGuard(ClassifierBank(embedder, targets), None, Metrics())
    guard.set_targets(
        [ActiveTarget(f"t{i}", t.name, tuple(t.aliases), None, t) for i, t in enumerate(targets)]
    )
    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        asyncio.run(rounds(guard, args))
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
        return
    cpu = asyncio.run(rounds(guard, args))
    print(
        f"{args.targets} targets, {args.rounds} bursts of {args.concurrency} protect calls: "
        f"CPU p50 {percentile(cpu, 0.5):.2f} ms a burst (p90 {percentile(cpu, 0.9):.2f})"
    )


if __name__ == "__main__":
    main()
