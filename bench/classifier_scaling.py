"""The guard's classifier alone against the number of targets: one request, and a burst's batch.

    .venv/bin/python bench/classifier_scaling.py [--targets 1 20 100] [--repeats 40]

Builds a `ClassifierBank` with 1, 20 and 100 targets of the shipped kind (the README's Harry
Potter target, then bench/targets.py's people, each trained with the registration's default
`TrainConfig`; trained targets are cached under `--cache` so later runs only load them) and times
`classify_groups` as the guard calls it (server.services.batching: only the flagged targets'
Decisions; one row with every Decision) on single requests, and on the 32 requests of a burst
in one call (bench/workload.py's prompts: one user turn each,
unflagged, then flagged ones about Harry Potter), every text classified afresh (the bank's cache
off); then the same batch again with the cache on (what a chat's re-sent turns cost). Prints
p50 / p99 per call (wall; and the CPU p50 of this thread, steadier on a shared machine) and the
rows that went on to the second (MiniLM) stage per call. One torch and one BLAS thread, as the
gateway runs the guard.

`--profile N` profiles the batch of unflagged prompts at N targets instead (cProfile, top 25 by
own time).
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import inspect
import json
import pstats
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from threadpoolctl import threadpool_limits

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.targets import HARRY_POTTER, people  # noqa: E402
from bench.workload import flagged_prompts, percentile, unflagged_prompts  # noqa: E402
from classifier import (  # noqa: E402
    ClassifierBank,
    Embedder,
    TargetClassifier,
    TargetSpec,
    TrainConfig,
    train_target,
)

BURST = 32


def specs(n: int) -> list[TargetSpec]:
    """Harry Potter, then `n - 1` people, as the registration API builds their specs."""
    bodies = [HARRY_POTTER, *people(n - 1)] if n else []
    return [
        TargetSpec(
            name=b["name"],
            aliases=b.get("aliases", ()),
            forget_examples=[
                e if isinstance(e, str) else e["prompt"] for e in b["forget_examples"]
            ],
            retain_examples=b.get("retain_examples", ()),
            description=b.get("description", ""),
        )
        for b in bodies
    ]


def trained(spec: TargetSpec, embedder: Embedder, cache: Path) -> TargetClassifier:
    """`spec` trained with the default config, from `cache` when it was trained before."""
    key = json.dumps(
        [spec.name, spec.aliases, spec.forget_examples, spec.retain_examples, spec.description]
    )
    digest = hashlib.sha256(f"{embedder.fingerprint}{key}".encode()).hexdigest()[:24]
    path = cache / f"{digest}.clf"
    if path.is_file():
        return TargetClassifier.from_bytes(path.read_bytes())
    target = train_target(spec, embedder, TrainConfig())
    cache.mkdir(parents=True, exist_ok=True)
    path.write_bytes(target.to_bytes())
    return target


def make_bank(embedder: Embedder, targets: list[TargetClassifier], cache: bool) -> ClassifierBank:
    """A bank with its cache on or off (a bank without a cache, before there was one, as is)."""
    if "cache_size" not in inspect.signature(ClassifierBank).parameters:
        return ClassifierBank(embedder, targets)
    return ClassifierBank(embedder, targets, **({} if cache else {"cache_size": 0}))


def as_guard(bank: ClassifierBank) -> Callable[[list[list[str]]], object]:
    """`classify_groups` as the guard calls it: only the flagged targets' Decisions (a bank
    from before `only_flagged`: every Decision, as the guard then asked)."""
    if "only_flagged" in inspect.signature(bank.classify_groups).parameters:
        return lambda groups: bank.classify_groups(groups, only_flagged=True)
    return bank.classify_groups


class _Counting:
    """Counts the texts the bank sends to the second stage (`Embedder.encode`)."""

    def __init__(self, embedder: Embedder) -> None:
        self.rows = 0
        self._encode = embedder.encode

        def encode(texts: Sequence[str], stop: threading.Event | None = None) -> np.ndarray:
            self.rows += len(texts)
            return self._encode(texts, stop)

        embedder.encode = encode  # type: ignore[method-assign]


def timed(fn: Callable[[], object], repeats: int) -> tuple[list[float], list[float]]:
    """Wall and CPU (this thread's) milliseconds of `repeats` calls, after one to warm up."""
    fn()
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.thread_time()
        fn()
        wall.append((time.perf_counter() - t0) * 1e3)
        cpu.append((time.thread_time() - c0) * 1e3)
    return wall, cpu


def measure(
    embedder: Embedder,
    targets: list[TargetClassifier],
    counter: _Counting,
    repeats: int,
) -> list[tuple[str, ...]]:
    """Rows of the table for one set of targets: every text classified afresh (no cache),
    then the burst's batch sent again to a bank with the cache on (a chat's earlier turns)."""
    bank = make_bank(embedder, targets, cache=False)
    cached = make_bank(embedder, targets, cache=True)
    call, call_cached = as_guard(bank), as_guard(cached)
    rows = []
    for kind, prompts in (
        ("unflagged", unflagged_prompts(BURST)),
        ("flagged", flagged_prompts(BURST)),
    ):
        groups = [[p] for p in prompts]
        counter.rows = 0
        call(groups)
        batch_rows = str(counter.rows)
        counter.rows = 0
        for g in groups:
            call([g])
        single_rows = f"{counter.rows / len(groups):.2f}"
        # Flagged prompts all go on to MiniLM: fewer repeats keep the run short.
        n = repeats if kind == "unflagged" else max(2, repeats // 4)
        batch = timed(lambda g=groups: call(g), n)
        every = timed(lambda g=groups: bank.classify_groups(g), n)
        single: tuple[list[float], list[float]] = ([], [])
        for g in groups:
            wall, cpu = timed(lambda g=g: call([g]), max(1, n // 8))
            single[0].extend(wall)
            single[1].extend(cpu)
        call_cached(groups)
        counter.rows = 0
        again = timed(lambda g=groups: call_cached(g), repeats)
        again_rows = f"{counter.rows / (repeats + 1):.2f}"
        for label, (wall, cpu), stage2 in (
            ("single", single, single_rows),
            (f"batch of {BURST}", batch, batch_rows),
            (f"batch of {BURST}, every Decision", every, batch_rows),
            (f"batch of {BURST}, again (cache)", again, again_rows),
        ):
            p50, p99 = percentile(wall, 0.5), percentile(wall, 0.99)
            cpu50 = percentile(cpu, 0.5)
            rows.append((kind, label, f"{p50:.2f}", f"{p99:.2f}", f"{cpu50:.2f}", stage2))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--targets", type=int, nargs="+", default=[1, 20, 100])
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--cache", type=Path, default=ROOT / ".obliviate" / "bench-targets")
    parser.add_argument("--profile", type=int, default=0, help="profile at this many targets")
    parser.add_argument(
        "--blas-threads", type=int, default=1, help="numpy's BLAS threads (0: leave as is)"
    )
    args = parser.parse_args()

    # As the gateway runs the guard (server.deps.build_guard): one torch thread, one BLAS thread.
    torch.set_num_threads(1)
    if args.blas_threads:
        threadpool_limits(args.blas_threads, user_api="blas")

    embedder = Embedder()
    counter = _Counting(embedder)
    most = max([*args.targets, args.profile])
    t0 = time.perf_counter()
    targets = [trained(s, embedder, args.cache) for s in specs(most)]
    print(f"{len(targets)} targets ready in {time.perf_counter() - t0:.1f} s", file=sys.stderr)

    if args.profile:
        bank = make_bank(embedder, targets[: args.profile], cache=False)
        groups = [[p] for p in unflagged_prompts(BURST)]
        call = as_guard(bank)
        call(groups)
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(args.repeats):
            call(groups)
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
        return

    print("| targets | prompts | call | p50 ms | p99 ms | CPU p50 ms | stage-2 rows per call |")
    print("|---:|---|---|---:|---:|---:|---:|")
    for n in args.targets:
        for row in measure(embedder, targets[:n], counter, args.repeats):
            print("| " + " | ".join((str(n), *row)) + " |")


if __name__ == "__main__":
    main()
