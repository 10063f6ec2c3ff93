"""Overhead of obliviate against vLLM's own OpenAI server, same model, same settings, one run.

Both servers run side by side; rounds alternate (vLLM, obliviate, vLLM, ...) so drift on the
machine hits both. Each round sends `--concurrency` chat requests at once, each generating
exactly `--tokens` tokens greedily (min_tokens = max_tokens). Prints the throughput ratio and
the latency obliviate adds (p50, p99), and writes JSON to bench/results/overhead.json.

    python bench/overhead.py [--rounds 3] [--concurrency 32] [--tokens 64] [--target]

`--target` registers a forget target first, so the guard classifies every (unrelated) request.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server.modelstore import resolve_model  # noqa: E402
from tests.e2e.servers import (  # noqa: E402
    ADMIN_TOKEN,
    MODEL_NAME,
    free_port,
    gateway_argv,
    running,
    vllm_server_argv,
)

DTYPE = "bfloat16"  # the fastest here; both servers get the same

TOPICS = [
    "the water cycle", "photosynthesis", "the Roman empire", "volcanoes", "prime numbers",
    "the French revolution", "black holes", "how vaccines work", "the stock market", "jazz",
    "machine learning", "the Great Wall of China", "climate change", "the human heart",
    "electric cars", "chess openings", "coffee", "the moon landing", "earthquakes", "bees",
    "the printing press", "tides", "the Amazon rainforest", "DNA", "the Olympic games",
    "glaciers", "bread baking", "the Internet", "penguins", "the Renaissance", "rainbows",
    "solar panels",
]  # fmt: skip


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def one_round(url: str, concurrency: int, tokens: int) -> dict[str, float | list[float]]:
    prompts = [f"Tell me about {TOPICS[i % len(TOPICS)]}." for i in range(concurrency)]
    return await one_round_with(url, prompts, tokens)


async def one_round_with(
    url: str, prompts: list[str], tokens: int
) -> dict[str, float | list[float]]:
    """Send every prompt at once (greedy, exactly `tokens` tokens each); throughput, latencies."""
    concurrency = len(prompts)

    async def one(client: httpx.AsyncClient, i: int) -> tuple[float, int]:
        body = {
            "model": MODEL_NAME,
            "messages": [{"role": "user", "content": prompts[i]}],
            "temperature": 0,
            "max_tokens": tokens,
            "min_tokens": tokens,
        }
        start = time.perf_counter()
        response = await client.post(f"{url}/v1/chat/completions", json=body)
        response.raise_for_status()
        return time.perf_counter() - start, response.json()["usage"]["completion_tokens"]

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(one(client, i) for i in range(concurrency)))
        wall = time.perf_counter() - start
    latencies = [r[0] for r in results]
    generated = sum(r[1] for r in results)
    return {
        "wall_s": wall,
        "tokens": generated,
        "tok_per_s": generated / wall,
        "latencies": latencies,
    }


def guard_seconds(url: str) -> tuple[float, float]:
    """(total seconds, requests) of the gateway's guard, from its Prometheus histogram."""
    total = count = 0.0
    for line in httpx.get(
        f"{url}/metrics", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=30
    ).text.splitlines():
        if line.startswith("obliviate_guard_seconds_sum"):
            total = float(line.split()[-1])
        elif line.startswith("obliviate_guard_seconds_count"):
            count = float(line.split()[-1])
    return total, count


def register_target(url: str, token: str) -> None:
    body = {
        "name": "Harry Potter",
        "aliases": ["Harry Potter", "Hogwarts", "J.K. Rowling"],
        "forget_examples": [
            "Who wrote Harry Potter?",
            "What house is Harry Potter in at Hogwarts?",
            "Who are Harry Potter's best friends?",
        ],
        "mode": "eco",
    }
    headers = {"Authorization": f"Bearer {token}"}
    job = httpx.post(f"{url}/admin/targets", json=body, headers=headers, timeout=60).json()
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        state = httpx.get(f"{url}/admin/jobs/{job['id']}", headers=headers, timeout=60).json()
        if state["status"] in ("succeeded", "failed"):
            if state["status"] == "failed":
                raise RuntimeError(f"target registration failed: {state}")
            return
        time.sleep(1)
    raise TimeoutError("target registration did not finish")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--target", action="store_true", help="register a forget target first")
    parser.add_argument("--out", type=Path, default=Path("bench/results/overhead.json"))
    args = parser.parse_args()

    model = resolve_model(None, auto_pull=True)
    logs = Path(tempfile.mkdtemp(prefix="obliviate-bench-"))
    vllm_port, gw_port = free_port(), free_port()
    extra = ["--model", str(model), "--data-dir", str(logs / "data")]
    vllm_ready = f"http://127.0.0.1:{vllm_port}/v1/models"
    gw_ready = f"http://127.0.0.1:{gw_port}/ready"
    with (
        running(
            vllm_server_argv(model, vllm_port, dtype=DTYPE),
            ready_url=vllm_ready,
            log=logs / "vllm.log",
        ),
        running(
            gateway_argv(gw_port, *extra, dtype=DTYPE), ready_url=gw_ready, log=logs / "gateway.log"
        ),
    ):
        targets = {
            "vllm": f"http://127.0.0.1:{vllm_port}",
            "obliviate": f"http://127.0.0.1:{gw_port}",
        }
        if args.target:
            register_target(targets["obliviate"], ADMIN_TOKEN)
        for url in targets.values():  # warm-up: first requests pay one-off costs
            asyncio.run(one_round(url, 4, 8))
        rounds: dict[str, list[dict[str, float | list[float]]]] = {"vllm": [], "obliviate": []}
        guard_before = guard_seconds(targets["obliviate"])
        for r in range(args.rounds):
            for name, url in targets.items():
                result = asyncio.run(one_round(url, args.concurrency, args.tokens))
                rounds[name].append(result)
                print(f"round {r + 1} {name:9s} {result['tok_per_s']:.1f} tok/s")
        guard_after = guard_seconds(targets["obliviate"])

    def summary(name: str) -> dict[str, float]:
        lat = [x for rnd in rounds[name] for x in rnd["latencies"]]  # type: ignore[union-attr]
        return {
            "tok_per_s_median": statistics.median(float(rnd["tok_per_s"]) for rnd in rounds[name]),  # type: ignore[arg-type]
            "latency_p50_ms": 1000 * percentile(lat, 0.5),
            "latency_p99_ms": 1000 * percentile(lat, 0.99),
        }

    ours, theirs = summary("obliviate"), summary("vllm")
    report = {
        "workload": {
            "concurrency": args.concurrency, "tokens": args.tokens, "rounds": args.rounds,
            "target_registered": args.target, "model": MODEL_NAME,
        },
        "vllm": theirs,
        "obliviate": ours,
        "throughput_ratio": ours["tok_per_s_median"] / theirs["tok_per_s_median"],
        "added_latency_p50_ms": ours["latency_p50_ms"] - theirs["latency_p50_ms"],
        "added_latency_p99_ms": ours["latency_p99_ms"] - theirs["latency_p99_ms"],
        "guard_mean_ms_per_request": 1000
        * (guard_after[0] - guard_before[0])
        / max(1.0, guard_after[1] - guard_before[1]),
        "guarded_requests": guard_after[1] - guard_before[1],
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
