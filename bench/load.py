"""Load: N concurrent streaming chat clients for D seconds against a real gateway on loopback.

Each client loops until the deadline: one streaming chat request, read to [DONE]; a 429 is
counted and its Retry-After honoured (capped at 1 s so the queue limit stays under pressure).
Reports requests completed, errors (anything but a complete stream or a 429), 429s and whether
each carried Retry-After, tokens, latency, and the gateway's RSS over time (start, peak, end;
the process alone and with its children, i.e. vLLM's engine core). Writes JSON.

    python bench/load.py [--clients 64] [--duration 60] [--tokens 32]
                         [--max-concurrent 16] [--max-queued 32] [--engine vllm_local]

With no --url it starts `obliviate serve` on the packaged default model with the given limits.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.e2e.servers import MODEL_NAME, engine_env, free_port, gateway_argv, running  # noqa: E402

PROMPTS = [
    "Tell me about the water cycle.", "Explain photosynthesis briefly.", "What is a prime?",
    "Describe a volcano.", "Why is the sky blue?", "How do bees make honey?",
    "What causes tides?", "Summarise the Renaissance.",
]  # fmt: skip


class MemorySampler:
    """RSS of a process (alone, and with its children) once a second, in a thread."""

    def __init__(self, pid: int, interval_s: float = 1.0) -> None:
        self._proc = psutil.Process(pid)
        self._interval = interval_s
        self._stop = threading.Event()
        self.samples: list[tuple[float, float, float]] = []  # (t, rss MiB, with children MiB)
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        try:
            own = self._proc.memory_info().rss
            kids = sum(c.memory_info().rss for c in self._proc.children(recursive=True))
        except psutil.Error:
            return
        self.samples.append((time.monotonic(), own / 2**20, (own + kids) / 2**20))

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self._interval)

    def __enter__(self) -> MemorySampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def summary(self) -> dict[str, Any]:
        own = [s[1] for s in self.samples]
        total = [s[2] for s in self.samples]
        t0 = self.samples[0][0] if self.samples else 0.0
        return {
            "rss_mib": {"start": own[0], "peak": max(own), "end": own[-1]},
            "rss_with_children_mib": {"start": total[0], "peak": max(total), "end": total[-1]},
            "timeline": [(round(t - t0, 1), round(a, 1), round(b, 1)) for t, a, b in self.samples],
        }


async def _client(
    http: httpx.AsyncClient, i: int, deadline: float, tokens: int, stats: dict[str, Any]
) -> None:
    n = 0
    while time.monotonic() < deadline:
        body = {
            "model": MODEL_NAME,
            "messages": [{"role": "user", "content": PROMPTS[(i + n) % len(PROMPTS)]}],
            "max_tokens": tokens,
            "temperature": 0,
            "stream": True,
        }
        n += 1
        started = time.monotonic()
        try:
            async with http.stream("POST", "/v1/chat/completions", json=body) as response:
                if response.status_code == 429:
                    await response.aread()
                    stats["429"] += 1
                    retry = response.headers.get("retry-after")
                    if retry is None:
                        stats["429_without_retry_after"] += 1
                    await asyncio.sleep(min(float(retry or 1), 1.0))
                    continue
                if response.status_code != 200:
                    await response.aread()
                    stats["errors"].append(f"{response.status_code}: {response.text[:200]}")
                    continue
                done, pieces, first = False, 0, None
                async for line in response.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data == "[DONE]":
                        done = True
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        break
                    for choice in chunk.get("choices", []):
                        if choice.get("delta", {}).get("content"):
                            pieces += 1
                            first = first or time.monotonic()
                if done:
                    stats["completed"] += 1
                    stats["chunks"] += pieces
                    stats["latency_s"].append(time.monotonic() - started)
                    if first is not None:
                        stats["ttft_s"].append(first - started)
                else:
                    stats["errors"].append("stream ended with an error event or before [DONE]")
        except httpx.HTTPError as e:
            stats["errors"].append(f"{type(e).__name__}: {e}")


async def drive(url: str, clients: int, duration_s: float, tokens: int) -> dict[str, Any]:
    """Run the clients against `url` (no /v1) and return the counts."""
    stats: dict[str, Any] = {
        "completed": 0,
        "429": 0,
        "429_without_retry_after": 0,
        "errors": [],
        "chunks": 0,
        "latency_s": [],
        "ttft_s": [],
    }
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    timeout = httpx.Timeout(120.0, connect=10.0)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout) as http:
        deadline = time.monotonic() + duration_s
        await asyncio.gather(*(_client(http, i, deadline, tokens, stats) for i in range(clients)))
    return stats


def run_load(url: str, pid: int, clients: int, duration_s: float, tokens: int) -> dict[str, Any]:
    """Drive the load while sampling the gateway's memory; one report."""
    with MemorySampler(pid) as memory:
        started = time.monotonic()
        stats = asyncio.run(drive(url, clients, duration_s, tokens))
        wall = time.monotonic() - started
    lat, ttft = stats.pop("latency_s"), stats.pop("ttft_s")

    def pct(values: list[float], q: float) -> float | None:
        if not values:
            return None
        ordered = sorted(values)
        return round(ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))], 3)

    errors = stats.pop("errors")
    return {
        "clients": clients,
        "duration_s": duration_s,
        "wall_s": round(wall, 1),
        "requests_completed": stats["completed"],
        "errors": len(errors),
        "error_samples": errors[:10],
        "responses_429": stats["429"],
        "responses_429_without_retry_after": stats["429_without_retry_after"],
        "streamed_chunks": stats["chunks"],
        "chunks_per_s": round(stats["chunks"] / wall, 1),
        "latency_p50_s": pct(lat, 0.5),
        "latency_p99_s": pct(lat, 0.99),
        "ttft_p50_s": pct(ttft, 0.5),
        "latency_mean_s": round(statistics.fmean(lat), 3) if lat else None,
        **memory.summary(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--max-concurrent", type=int, default=16)
    parser.add_argument("--max-queued", type=int, default=32)
    parser.add_argument("--url", help="an already running gateway (then --pid is needed)")
    parser.add_argument("--pid", type=int, help="its process id, for the memory figures")
    parser.add_argument("--out", type=Path, default=Path("bench/results/load.json"))
    args = parser.parse_args()

    if args.url:
        report = run_load(args.url, args.pid, args.clients, args.duration, args.tokens)
    else:
        from server.modelstore import resolve_model

        model = resolve_model(None, auto_pull=True)
        port = free_port()
        argv = gateway_argv(
            port,
            "--model", str(model),
            "--data-dir", tempfile.mkdtemp(prefix="obliviate-load-"),
            "--limits.max-concurrent-requests", str(args.max_concurrent),
            "--limits.max-queued-requests", str(args.max_queued),
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        log = Path(tempfile.mkdtemp(prefix="obliviate-load-log-")) / "gateway.log"
        with running(argv, ready_url=f"{url}/ready", log=log, env=engine_env()) as proc:
            report = run_load(url, proc.pid, args.clients, args.duration, args.tokens)
        report["limits"] = {"max_concurrent": args.max_concurrent, "max_queued": args.max_queued}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    shown = {k: v for k, v in report.items() if k != "timeline"}
    print(json.dumps(shown, indent=2))


if __name__ == "__main__":
    main()
