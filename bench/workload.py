"""The burst the benchmarks send, and what they read back from a gateway (guard histogram, RSS).

A round sends every prompt at once as a chat request (greedy, exactly `tokens` tokens each:
min_tokens = max_tokens), streamed or not, and returns throughput, per-request latencies (and
time to first token when streamed) and the generated texts, so two servers can be compared
byte for byte.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import statistics
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

from tests.e2e.servers import (
    ADMIN_TOKEN,
    free_port,
    gateway_argv,
    running,
    vllm_server_argv,
)

# /metrics is closed by default; the admin token opens it.
METRICS_AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}

TOPICS = [
    "the water cycle", "photosynthesis", "the Roman empire", "volcanoes", "prime numbers",
    "the French revolution", "black holes", "how vaccines work", "the stock market", "jazz",
    "machine learning", "the Great Wall of China", "climate change", "the human heart",
    "electric cars", "chess openings", "coffee", "the moon landing", "earthquakes", "bees",
    "the printing press", "tides", "the Amazon rainforest", "DNA", "the Olympic games",
    "glaciers", "bread baking", "the Internet", "penguins", "the Renaissance", "rainbows",
    "solar panels",
]  # fmt: skip


# A round's prompts differ from every earlier round's: the guard keeps its verdicts on texts
# it has read (server.services.guard; a chat's re-sent turns), so a burst that repeats the last
# one measures the cache, not the classifier.
ASKS = (
    "Tell me about {}.", "What should I know about {}?", "Explain {} in simple words.",
    "Give me three facts about {}.", "Why does {} matter?", "Write a short note on {}.",
    "What is surprising about {}?", "Summarise what is known about {}.",
)  # fmt: skip


def _ask(i: int, round: int, lead: str = "") -> str:
    """Round `round`'s question `i` (round 0: "Tell me about {lead}{topic}.")."""
    text = ASKS[round % len(ASKS)].format(lead + TOPICS[i % len(TOPICS)])
    if i >= len(TOPICS) or round >= len(ASKS):
        text += f" Keep it short for reader {i // len(TOPICS)}-{round // len(ASKS)}."
    return text


def unflagged_prompts(n: int, round: int = 0) -> list[str]:
    return [_ask(i, round) for i in range(n)]


def flagged_prompts(n: int, round: int = 0) -> list[str]:
    """Prompts about the Harry Potter target (bench.targets.HARRY_POTTER), none of its examples."""
    return [_ask(i, round, "Harry Potter and ") for i in range(n)]


@dataclass
class Round:
    wall_s: float
    tokens: int
    latencies: list[float]
    texts: list[str]
    ttft: list[float] = field(default_factory=list)

    @property
    def tok_per_s(self) -> float:
        return self.tokens / self.wall_s

    @property
    def ttft_median(self) -> float | None:
        """The burst's median time to first token, s (None when not streamed)."""
        return statistics.median(self.ttft) if self.ttft else None


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def burst(
    url: str, model: str, prompts: list[str], tokens: int, *, stream: bool = False
) -> Round:
    """Send every prompt at once; wait for all answers."""

    async def one(client: httpx.AsyncClient, prompt: str) -> tuple[float, float, int, str]:
        body: dict[str, object] = {
            "model": model,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": 0,
            "max_tokens": tokens,
            "min_tokens": tokens,
        }
        start = time.perf_counter()
        if not stream:
            response = await client.post(f"{url}/v1/chat/completions", json=body)
            response.raise_for_status()
            reply = response.json()
            elapsed = time.perf_counter() - start
            text = reply["choices"][0]["message"]["content"]
            return elapsed, elapsed, reply["usage"]["completion_tokens"], text
        body.update(stream=True, stream_options={"include_usage": True})
        parts: list[str] = []
        first = 0.0
        used = 0
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    used = chunk["usage"]["completion_tokens"]
                for choice in chunk.get("choices", []):
                    piece = choice.get("delta", {}).get("content")
                    if piece:
                        first = first or time.perf_counter() - start
                        parts.append(piece)
        return time.perf_counter() - start, first, used, "".join(parts)

    limits = httpx.Limits(max_connections=len(prompts), max_keepalive_connections=len(prompts))
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(one(client, p) for p in prompts))
        wall = time.perf_counter() - start
    return Round(
        wall_s=wall,
        tokens=sum(r[2] for r in results),
        latencies=[r[0] for r in results],
        texts=[r[3] for r in results],
        ttft=[r[1] for r in results] if stream else [],
    )


def run_burst(url: str, model: str, prompts: list[str], tokens: int, *, stream: bool) -> Round:
    return asyncio.run(burst(url, model, prompts, tokens, stream=stream))


# --- what a gateway reports ---------------------------------------------------------------


def histogram(url: str, name: str) -> dict[float, float]:
    """Cumulative bucket counts {upper bound: count} of a Prometheus histogram on /metrics."""
    buckets: dict[float, float] = {}
    for line in httpx.get(f"{url}/metrics", headers=METRICS_AUTH, timeout=30).text.splitlines():
        if line.startswith(f"{name}_bucket{{"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            buckets[float("inf") if le == "+Inf" else float(le)] = float(line.split()[-1])
    return buckets


def histogram_sum(url: str, name: str) -> float:
    """The `_sum` sample of a Prometheus histogram on /metrics."""
    for line in httpx.get(f"{url}/metrics", headers=METRICS_AUTH, timeout=30).text.splitlines():
        if line.startswith(f"{name}_sum"):
            return float(line.split()[-1])
    return 0.0


def histogram_delta(before: dict[float, float], after: dict[float, float]) -> dict[float, float]:
    return {le: after[le] - before.get(le, 0.0) for le in after}


def histogram_quantile(buckets: dict[float, float], q: float) -> float | None:
    """Prometheus' histogram_quantile: linear interpolation inside the bucket holding q."""
    bounds = sorted(buckets)
    total = buckets[bounds[-1]] if bounds else 0.0
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for le in bounds:
        count = buckets[le]
        if count >= rank:
            if le == float("inf"):
                return lower
            inside = count - below
            return lower + (le - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = le, count
    return lower


def counter(url: str, name: str, **labels: str) -> float:
    """Sum of a counter's samples whose labels include `labels`."""
    total = 0.0
    wanted = [f'{k}="{v}"' for k, v in labels.items()]
    for line in httpx.get(f"{url}/metrics", headers=METRICS_AUTH, timeout=30).text.splitlines():
        if line.startswith(f"{name}_total") and all(w in line for w in wanted):
            total += float(line.split()[-1])
    return total


def tree_rss_mib(pid: int) -> tuple[float, float]:
    """(the process alone, the process and its children) resident memory, MiB."""
    root = psutil.Process(pid)
    own = root.memory_info().rss
    kids = sum(p.memory_info().rss for p in root.children(recursive=True))
    return own / 2**20, (own + kids) / 2**20


def interval(values: list[float], *, resamples: int = 4000, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the median of `values`."""
    rng = random.Random(seed)
    medians = sorted(
        statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples)
    )
    return medians[int(0.025 * resamples)], medians[int(0.975 * resamples) - 1]


def cpu_seconds(pid: int) -> tuple[float, float]:
    """CPU seconds (user + system) of process `pid`'s main thread (the gateway's event loop)
    and of the whole process (every thread), from /proc; resolution one clock tick."""
    tick = os.sysconf("SC_CLK_TCK")

    def read(path: str) -> float:
        fields = Path(path).read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / tick  # utime, stime

    return read(f"/proc/{pid}/task/{pid}/stat"), read(f"/proc/{pid}/stat")


@contextmanager
def side_by_side(
    model: Path, dtype: str, logs: Path, gateway_args: Sequence[str] = ()
) -> Iterator[tuple[dict[str, str], dict[str, int]]]:
    """vLLM's own OpenAI server and `obliviate serve` (data in `logs`/data) on the same model
    and dtype, both ready: their URLs and process ids, keyed "vllm" and "obliviate"."""
    vllm_port, gw_port = free_port(), free_port()
    urls = {"vllm": f"http://127.0.0.1:{vllm_port}", "obliviate": f"http://127.0.0.1:{gw_port}"}
    extra = ["--model", str(model), "--data-dir", str(logs / "data"), *gateway_args]
    with (
        running(
            vllm_server_argv(model, vllm_port, dtype=dtype),
            ready_url=f"{urls['vllm']}/v1/models",
            log=logs / "vllm.log",
        ) as vllm_proc,
        running(
            gateway_argv(gw_port, *extra, dtype=dtype),
            ready_url=f"{urls['obliviate']}/ready",
            log=logs / "gateway.log",
        ) as gw_proc,
    ):
        yield urls, {"vllm": vllm_proc.pid, "obliviate": gw_proc.pid}
