"""δ mode's cost on one engine, in one run: tokens/s with the offset against plain generation.

One gateway (vLLM in process; bfloat16 where the CPU has native bf16, else float32) with a δ
target (scope flagged). Rounds alternate between plain prompts (unflagged: no offset) and
prompts about the target (flagged: the two small models run at every step), each round
`--concurrency` chat requests generating exactly `--tokens` tokens.
Memory added is the resident memory of the gateway's process tree after the δ rounds minus before
the first δ request (the small models load then). Writes bench/results/delta.json.

    python bench/delta.py [--unlearned DIR] [--rounds 3] [--concurrency 8] [--tokens 32]
                          [--dtype bfloat16|float32]

`--unlearned` adopts a model trained by `obliviate snap train`; without it, the registration job
trains one (minutes). For the cost alone any folder of the base's architecture will do (a copy of
the base gives a zero offset at the same price). The gateway runs with its output guard off, so
that answers naming the target are not restarted: the tokens/s are the offset's cost alone.

The ideal ratio is what δ would cost if the only extra work were the small models' decode steps:
t_big / (t_big + t_small), with t_big the plain rounds' time per decode step (concurrency /
tokens per second) and t_small both small models' batched decode step of `--concurrency`
sequences in the engine's dtype, timed alone in this process on one thread after the rounds
(about 1/3 when the three models are the same size). `delta_over_ideal` is the share of it
reached. With a spare core the small models run beside the big one and the ratio can pass the
ideal.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.workload import TOPICS, flagged_prompts, run_burst, unflagged_prompts  # noqa: E402
from offset.snap import native_bf16  # noqa: E402
from server.engine import ChatPrompt  # noqa: E402
from server.engine.templating import render_prompt  # noqa: E402
from server.modelstore import resolve_model  # noqa: E402
from tests.e2e.servers import (  # noqa: E402
    ADMIN_TOKEN,
    MODEL_NAME,
    free_port,
    gateway_argv,
    running,
)

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
TARGET = {
    "name": "Harry Potter",
    "aliases": ["Harry Potter", "Hogwarts", "J.K. Rowling", "Hermione Granger"],
    "forget_examples": [
        "Who wrote Harry Potter?",
        "What is the name of the school Harry Potter attends?",
        "Who are Harry Potter's best friends?",
    ],
    "retain_examples": ["Who wrote The Lord of the Rings?"],
    "mode": "delta",
}


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its children (vLLM's engine core is a child)."""
    root = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])


HELD_OUT = [
    "Who is the author of the Harry Potter books?",
    "Which house is Harry Potter sorted into at Hogwarts?",
    "What is the name of Harry Potter's owl?",
]
"""Questions about the target that are not among its examples: answers before and after."""
NEIGHBOURS = ["Who wrote The Hobbit?", "What is the capital of France?"]


def answers(url: str, questions: list[str], tokens: int = 48) -> dict[str, str]:
    """Greedy chat answers through the gateway."""
    out = {}
    for q in questions:
        body = {
            "model": MODEL_NAME,
            "messages": [{"role": "user", "content": q}],
            "temperature": 0,
            "max_tokens": tokens,
        }
        reply = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=600).json()
        out[q] = reply["choices"][0]["message"]["content"]
    return out


def register(url: str, options: dict[str, object]) -> dict[str, object]:
    body = {**TARGET, "options": options}
    job = httpx.post(f"{url}/admin/targets", json=body, headers=AUTH, timeout=60).json()
    while (state := httpx.get(f"{url}/admin/jobs/{job['id']}", headers=AUTH).json())[
        "status"
    ] not in ("succeeded", "failed"):
        time.sleep(2)
    if state["status"] != "succeeded":
        raise RuntimeError(f"registration failed: {state}")
    target: dict[str, object] = httpx.get(
        f"{url}/admin/targets/{state['target_id']}", headers=AUTH
    ).json()
    return target


def small_step_seconds(
    unlearned: Path, base: Path, prompt_ids: list[list[int]], steps: int, dtype: str
) -> float:
    """Median time of one batched decode step of both small models, one thread, alone, loaded
    as the δ processor loads them (`OffsetModels`, the engine's dtype)."""
    import torch

    from offset import DeltaSpec, OffsetModels

    torch.set_num_threads(1)
    models = OffsetModels("cpu", getattr(torch, dtype))
    pair = models.pair(DeltaSpec(str(unlearned), str(base)))
    seqs = {i: list(ids) for i, ids in enumerate(prompt_ids)}
    pair.offsets(list(seqs.items()))  # prompts
    times = []
    for step in range(steps):
        for ids in seqs.values():
            ids.append(100 + step)
        started = time.perf_counter()
        pair.offsets(list(seqs.items()))
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def ideal_ratio(
    unlearned: Path,
    base: Path,
    tokenizer_dir: Path,
    prompts: list[str],
    tokens: int,
    plain_tok_per_s: float,
    dtype: str,
) -> dict[str, float]:
    """t_big / (t_big + t_small) for `prompts` decoding together (see the module docstring)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    # The prompts' token ids as the gateway renders a one-turn chat request.
    chats = [ChatPrompt([{"role": "user", "content": q}]) for q in prompts]
    prompt_ids = [render_prompt(tokenizer, chat).token_ids for chat in chats]
    t_small = small_step_seconds(unlearned, base, prompt_ids, tokens, dtype)
    t_big = len(prompts) / plain_tok_per_s
    return {"big_step_s": t_big, "small_models_step_s": t_small,
            "ideal_ratio": t_big / (t_big + t_small)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--unlearned", type=Path, help="an already SNAP-trained model folder")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("bench/results/delta.json"))
    # Emulated bf16 (CPUs without avx512_bf16/amx_bf16) is several times slower than float32.
    parser.add_argument("--dtype", default="bfloat16" if native_bf16() else "float32")
    args = parser.parse_args()

    model = resolve_model(None, auto_pull=True)
    logs = Path(tempfile.mkdtemp(prefix="obliviate-delta-"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # The output guard off: it restarts answers that name the target (a zero-offset copy's all
    # do), which would count its regenerations as δ's cost (bench/output_guard.py measures it).
    argv = gateway_argv(
        port, "--model", str(model), "--data-dir", str(logs / "data"), "--guard.output", "false",
        dtype=args.dtype,
    )  # fmt: skip
    plain = unflagged_prompts(len(TOPICS))
    flagged = flagged_prompts(len(TOPICS))
    options: dict[str, object] = {"scope": "flagged", "snap_max_steps": 30}
    if args.unlearned is not None:
        options["unlearned_model"] = str(args.unlearned.resolve())
    with running(argv, ready_url=f"{url}/ready", log=logs / "gateway.log") as proc:
        before = answers(url, HELD_OUT + NEIGHBOURS)
        started = time.perf_counter()
        target = register(url, options)
        registration_s = time.perf_counter() - started
        run_burst(url, MODEL_NAME, plain[:4], 8, stream=False)  # warm-up
        rss_before = tree_rss(proc.pid)
        run_burst(url, MODEL_NAME, flagged[:2], 8, stream=False)  # loads the small models
        rounds: dict[str, list[float]] = {"plain": [], "delta": []}
        for r in range(args.rounds):
            for name, prompts in (("plain", plain), ("delta", flagged)):
                result = run_burst(
                    url, MODEL_NAME, prompts[: args.concurrency], args.tokens, stream=False
                )
                rounds[name].append(result.tok_per_s)
                print(f"round {r + 1} {name:5s} {result.tok_per_s:.1f} tok/s")
        rss_after = tree_rss(proc.pid)
        after = answers(url, HELD_OUT + NEIGHBOURS)
        metrics = httpx.get(f"{url}/metrics", headers=AUTH).text
    offset = (target.get("calibration") or {}).get("offset") or {}  # type: ignore[union-attr]
    plain_s, delta_s = statistics.median(rounds["plain"]), statistics.median(rounds["delta"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rounds": rounds, "ratio": delta_s / plain_s}, indent=2))
    ideal = ideal_ratio(
        Path(offset.get("unlearned", options.get("unlearned_model", model))),
        Path(offset.get("base", model)),
        Path(model),
        flagged[: args.concurrency],
        args.tokens,
        plain_s,
        args.dtype,
    )
    delta_decisions = sum(
        float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith("obliviate_guard_decisions_total") and 'action="delta"' in line
    )
    report = {
        "workload": {
            "concurrency": args.concurrency, "tokens": args.tokens, "rounds": args.rounds,
            "dtype": args.dtype, "model": str(model),
        },
        "plain_tok_per_s": statistics.median(rounds["plain"]),
        "delta_tok_per_s": statistics.median(rounds["delta"]),
        "ratio_delta_over_plain": statistics.median(rounds["delta"])
        / statistics.median(rounds["plain"]),
        **ideal,
        "delta_over_ideal": delta_s / plain_s / ideal["ideal_ratio"],
        "rounds": rounds,
        "memory_added_mib": (rss_after - rss_before) / 2**20,
        "memory_before_mib": rss_before / 2**20,
        "flagged_requests": delta_decisions,
        "registration_s": registration_s,
        "snap": target.get("calibration"),
        "examples": [{"question": q, "before": before[q], "after": after[q]} for q in before],
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str))
    print(json.dumps({k: v for k, v in report.items() if k != "snap"}, indent=2))
    snap = (target.get("calibration") or {}).get("offset") or target.get("calibration")
    print(json.dumps(snap, indent=2, default=str)[:3000])


if __name__ == "__main__":
    main()
