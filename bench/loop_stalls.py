"""How long an operator's action holds up the requests in flight: a scrape, a target change.

    python bench/loop_stalls.py [--targets 20] [--repeats 15] [--dtype float32|bfloat16]

The gateway's event loop serves every request; whatever an admin call or a Prometheus scrape
does on it, every request in flight waits for. This runs one `obliviate serve`, registers the
README's Harry Potter target and people up to `--targets` (bench/targets.py), and, while a
probe thread sends `GET /health` back to back (a request that is only loop work), repeats
each action `--repeats` times:
- scrape: `GET /metrics`;
- patch: `PATCH /admin/targets/{id}` disabling then enabling one target (each change makes the
  guard rebuild its active set);
Per action it reports the action's own latency (p50, p90) and the stall: the longest probe
latency while the action ran, less the probe's p50 when nothing else runs (p50 over the
repeats, and the worst). Writes bench/results/loop_stalls.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.targets import serving  # noqa: E402
from bench.workload import METRICS_AUTH, percentile  # noqa: E402
from offset.snap import native_bf16  # noqa: E402
from tests.e2e.servers import ADMIN_TOKEN  # noqa: E402

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


class Probe:
    """`GET /health` back to back on a thread of its own; (start, latency) of each."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._stop = threading.Event()
        self.samples: list[tuple[float, float]] = []
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Probe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        with httpx.Client(timeout=30) as client:
            while not self._stop.is_set():
                start = time.perf_counter()
                client.get(f"{self._url}/health").raise_for_status()
                self.samples.append((start, time.perf_counter() - start))

    def longest(self, start: float, end: float) -> float:
        """The longest probe latency of a request that was in flight between start and end."""
        return max((lat for t, lat in self.samples if t <= end and t + lat >= start), default=0.0)


def measure(
    probe: Probe, action: Callable[[], None], repeats: int, quiet_p50: float
) -> dict[str, Any]:
    took, stalls = [], []
    for _ in range(repeats):
        time.sleep(0.3)
        start = time.perf_counter()
        action()
        end = time.perf_counter()
        time.sleep(0.1)  # the probe request held up by the action's end comes back
        took.append(end - start)
        stalls.append(probe.longest(start, end) - quiet_p50)
    return {
        "took_p50_ms": 1000 * statistics.median(took),
        "took_p90_ms": 1000 * percentile(took, 0.9),
        "stall_p50_ms": 1000 * statistics.median(stalls),
        "stall_max_ms": 1000 * max(stalls),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--targets", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--dtype", default="bfloat16" if native_bf16() else "float32")
    parser.add_argument("--out", type=Path, default=Path("bench/results/loop_stalls.json"))
    args = parser.parse_args()
    if args.targets < 1 or args.repeats < 1:
        parser.error("give --targets >= 1 and --repeats >= 1")

    report: dict[str, Any] = {"workload": {**vars(args), "out": str(args.out)}}
    with serving(args.targets, dtype=args.dtype) as (url, _):
        target = httpx.get(f"{url}/admin/targets", headers=ADMIN, timeout=60).json()["data"][-1]

        def scrape() -> None:
            httpx.get(f"{url}/metrics", headers=METRICS_AUTH, timeout=60).raise_for_status()

        def patch() -> None:
            for enabled in (False, True):
                httpx.patch(
                    f"{url}/admin/targets/{target['id']}",
                    json={"enabled": enabled},
                    headers=ADMIN,
                    timeout=60,
                ).raise_for_status()

        with Probe(url) as probe:
            time.sleep(2)
            quiet = statistics.median(lat for _, lat in probe.samples)
            report["probe_quiet_p50_ms"] = 1000 * quiet
            for name, action in (("scrape", scrape), ("patch", patch)):
                report[name] = measure(probe, action, args.repeats, quiet)
                print(name, json.dumps(report[name]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"probe p50 with nothing else running: {report['probe_quiet_p50_ms']:.2f} ms")


if __name__ == "__main__":
    main()
