"""The guard's classifier alone against the number of targets: one request, and a burst's batch.

    .venv/bin/python bench/classifier_scaling.py [--targets 1 20 100] [--repeats 40]

Builds a `ClassifierBank` with 1, 20 and 100 targets of the shipped kind (the README's Harry
Potter target, then bench/targets.py's people, each trained with the registration's default
`TrainConfig`; trained targets are cached under `--cache` so later runs only load them) and times
`classify_groups` as the guard calls it (server.services.batching): on single requests, and on
the 32 requests of a burst in one call (bench/workload.py's prompts: one user turn each,
unflagged, then flagged ones about Harry Potter). Prints p50 / p99 per call and the rows that
went on to the second (MiniLM) stage per call. Single-threaded, a few seconds per level.

`--profile N` profiles the batch of unflagged prompts at N targets instead (cProfile, top 25 by
own time).
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import json
import pstats
import sys
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


class _Counting:
    """Counts the texts the bank sends to the second stage (`Embedder.encode`)."""

    def __init__(self, embedder: Embedder) -> None:
        self.rows = 0
        self._encode = embedder.encode

        def encode(texts: Sequence[str]) -> np.ndarray:
            self.rows += len(texts)
            return self._encode(texts)

        embedder.encode = encode  # type: ignore[method-assign]


def timed(fn: Callable[[], object], repeats: int) -> list[float]:
    fn()  # warm
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def measure(bank: ClassifierBank, counter: _Counting, repeats: int) -> list[tuple[str, ...]]:
    rows = []
    for kind, prompts in (
        ("unflagged", unflagged_prompts(BURST)),
        ("flagged", flagged_prompts(BURST)),
    ):
        groups = [[p] for p in prompts]
        counter.rows = 0
        bank.classify_groups(groups)
        batch_rows = counter.rows
        counter.rows = 0
        for g in groups:
            bank.classify_groups([g])
        single_rows = counter.rows / len(groups)
        # Flagged prompts all go on to MiniLM: fewer repeats keep the run short.
        n = repeats if kind == "unflagged" else max(2, repeats // 4)
        ms = timed(lambda g=groups: bank.classify_groups(g), n)
        single: list[float] = []
        for _ in range(max(1, n // 8)):
            for g in groups:
                t0 = time.perf_counter()
                bank.classify_groups([g])
                single.append((time.perf_counter() - t0) * 1e3)
        for label, values, stage2 in (
            ("single", single, f"{single_rows:.2f}"),
            (f"batch of {BURST}", ms, f"{batch_rows}"),
        ):
            rows.append(
                (
                    kind,
                    label,
                    f"{percentile(values, 0.5):.2f}",
                    f"{percentile(values, 0.99):.2f}",
                    stage2,
                )
            )
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
        bank = ClassifierBank(embedder, targets[: args.profile])
        groups = [[p] for p in unflagged_prompts(BURST)]
        bank.classify_groups(groups)
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(args.repeats):
            bank.classify_groups(groups)
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
        return

    print("| targets | prompts | call | p50 ms | p99 ms | stage-2 rows per call |")
    print("|---:|---|---|---:|---:|---:|")
    for n in args.targets:
        bank = ClassifierBank(embedder, targets[:n])
        for kind, label, p50, p99, stage2 in measure(bank, counter, args.repeats):
            print(f"| {n} | {kind} | {label} | {p50} | {p99} | {stage2} |")


if __name__ == "__main__":
    main()
