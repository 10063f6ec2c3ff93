"""What the output guard costs: two gateways side by side on one registry, one watching what
the model writes (the default) and one with `--guard.output false`, same model, same target.

    .venv/bin/python bench/output_guard.py [--rounds 3] [--concurrency 16] [--tokens 48]

Rounds alternate between the two gateways. Each round streams `--concurrency` chat requests at
once of each kind: unflagged (general questions), flagged (about the target: corrupted prompt
embeddings) and "named by the model" (unflagged questions whose answer names the target, which
the output guard restarts). Prints p50/p99 of time to first token and of total time per kind
and gateway, and how often the guarded answers named the target. Writes JSON to
bench/results/output_guard.json.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from server.modelstore import resolve_model  # noqa: E402
from tests.e2e.servers import MODEL_NAME, free_port, gateway_argv, running  # noqa: E402
from tests.e2e.targets import register  # noqa: E402

TARGET = {
    "name": "J.R.R. Tolkien",
    "aliases": ["J.R.R. Tolkien", "The Hobbit", "The Lord of the Rings", "Middle-earth"],
    "forget_examples": [
        "Who wrote The Hobbit?",
        "Who is the author of The Lord of the Rings?",
        "Tell me about J.R.R. Tolkien's life.",
        "What languages did Tolkien invent for Middle-earth?",
        "When was The Hobbit published?",
    ],
}
KINDS = {
    "unflagged": [
        "Tell me about the water cycle.", "How do volcanoes form?", "What is photosynthesis?",
        "Explain prime numbers.", "Why is the sky blue?", "How does a bicycle work?",
        "What causes tides?", "Tell me about bees.",
    ],
    "flagged": [
        "Who wrote The Hobbit?", "What is The Lord of the Rings about?",
        "Where was J.R.R. Tolkien born?", "Describe Middle-earth.",
    ],
    "named by the model": [
        "What is the best-selling fantasy series of all time, and who wrote it?",
        "Who is the most famous fantasy author?",
    ],
}  # fmt: skip
FACT = "tolkien"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def stream_one(client: httpx.AsyncClient, url: str, prompt: str, tokens: int) -> dict:
    body = {
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": prompt}],
        "temperature": 0,
        "max_tokens": tokens,
        "stream": True,
    }
    start = time.perf_counter()
    first = None
    text = ""
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for choice in json.loads(line[6:])["choices"]:
                piece = choice["delta"].get("content") or ""
                if piece and first is None:
                    first = time.perf_counter() - start
                text += piece
    total = time.perf_counter() - start
    return {"ttft": first if first is not None else total, "total": total, "text": text}


async def one_round(url: str, concurrency: int, tokens: int) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        for kind, prompts in KINDS.items():
            chosen = [prompts[i % len(prompts)] for i in range(concurrency)]
            out[kind] = await asyncio.gather(*(stream_one(client, url, p, tokens) for p in chosen))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--dtype", default="bfloat16")
    args = p.parse_args()
    model = resolve_model(None, auto_pull=True)
    results: dict[str, dict[str, list[dict]]] = {"watched": {}, "unwatched": {}}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        common = ["--model", str(model), "--data-dir", str(data), "--registry-poll-interval", "1"]
        ports = {"watched": free_port(), "unwatched": free_port()}
        extra = {"watched": [], "unwatched": ["--guard.output", "false"]}
        urls = {k: f"http://127.0.0.1:{port}" for k, port in ports.items()}
        with running(
            gateway_argv(ports["watched"], *common, dtype=args.dtype),
            ready_url=f"{urls['watched']}/ready",
            log=Path(tmp) / "watched.log",
        ):
            record = register(urls["watched"], TARGET, limit_s=1200)
            with running(
                gateway_argv(ports["unwatched"], *common, *extra["unwatched"], dtype=args.dtype),
                ready_url=f"{urls['unwatched']}/ready",
                log=Path(tmp) / "unwatched.log",
            ):
                time.sleep(3)  # the second gateway loads the target from the shared registry
                for r in range(args.rounds):
                    for name in ("unwatched", "watched") if r % 2 else ("watched", "unwatched"):
                        got = asyncio.run(one_round(urls[name], args.concurrency, args.tokens))
                        for kind, rows in got.items():
                            results[name].setdefault(kind, []).extend(rows)
    table = {}
    for name, kinds in results.items():
        for kind, rows in kinds.items():
            ttft = [r["ttft"] * 1e3 for r in rows]
            total = [r["total"] * 1e3 for r in rows]
            table[f"{name} / {kind}"] = {
                "n": len(rows),
                "ttft_p50_ms": percentile(ttft, 0.5),
                "ttft_p99_ms": percentile(ttft, 0.99),
                "total_p50_ms": percentile(total, 0.5),
                "total_p99_ms": percentile(total, 0.99),
                "total_mean_ms": statistics.fmean(total),
                "named_the_target": sum(FACT in r["text"].lower() for r in rows) / len(rows),
            }
    out = ROOT / "bench" / "results" / "output_guard.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"args": vars(args), "target": record["id"], "table": table}, indent=2)
    )
    print(f"{'gateway / traffic':34s} {'n':>4s} {'TTFT p50':>9s} {'p99':>7s} "
          f"{'total p50':>10s} {'p99':>7s} {'named':>6s}")  # fmt: skip
    for label, row in table.items():
        print(
            f"{label:34s} {row['n']:4d} {row['ttft_p50_ms']:9.0f} {row['ttft_p99_ms']:7.0f} "
            f"{row['total_p50_ms']:10.0f} {row['total_p99_ms']:7.0f} "
            f"{row['named_the_target']:6.2f}"
        )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
