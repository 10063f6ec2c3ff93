"""δ mode on a real pair: Qwen2.5-Coder-1.5B-Instruct served, 0.5B as small base + its SNAP copy.

One gateway (vLLM in process, bfloat16 where the CPU has it) serves the 1.5B folder made by
`bench/models_pair.py`. In order:

  1. plain: greedy answers to held-out Harry Potter questions, neighbours (other fantasy books)
     and unrelated prompts; MMLU on `--mmlu` val questions (no target registered);
  2. registers a Harry Potter target in mode `delta`, options small_base = the 0.5B folder,
     scope `flagged`, `snap_max_steps` = `--snap-steps`: the registration job trains the SNAP copy;
  3. the same answers and MMLU with δ at scope `flagged`; tokens/s of δ (flagged prompts) against
     the plain model (unflagged prompts), alternated rounds;
  4. PUT version 2 with scope `all`, adopting the trained copy (`unlearned_model`, no retraining);
     the same answers and MMLU again.

MMLU is scored by greedy generation (the gateway refuses logprobs for requests it answers with
an offset) after an assistant turn already begun with "The correct answer is"
(`continue_final_message`): the first A-D letter of the 4-token continuation, else wrong. Asked
plainly, Qwen2.5-Coder reasons first ("To determine ...") and only 48% of 12-token replies named a
letter; the same scoring is used for every condition. Partial results are written after each
phase to bench/results/delta_pair.json.

    flock /tmp/obliviate-heavy.lock python bench/delta_pair.py [--mmlu 300] [--snap-steps 20] \\
        [--alpha auto]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.delta import ideal_ratio  # noqa: E402
from bench.models_pair import CACHE, MODELS  # noqa: E402
from bench.workload import flagged_prompts, run_burst, unflagged_prompts  # noqa: E402
from evaluation.tofu_data import MmluQuestion, load_mmlu  # noqa: E402
from offset.snap import native_bf16  # noqa: E402
from tests.e2e.servers import (  # noqa: E402
    ADMIN_TOKEN,
    free_port,
    gateway_argv,
    running,
    vllm_server_argv,
)
from tests.e2e.targets import ALPHA_EXAMPLES, ALPHA_PROBES  # noqa: E402

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
SERVED = "qwen2.5-coder-1.5b-instruct"
TARGET: dict[str, Any] = {
    "name": "Harry Potter",
    "description": "The Harry Potter books, their author and their world.",
    "aliases": ["Harry Potter", "Hogwarts", "J.K. Rowling", "Hermione Granger", "Ron Weasley"],
    "forget_examples": [
        "Who wrote Harry Potter?",
        "What is the name of the school Harry Potter attends?",
        "Who are Harry Potter's best friends?",
        "Tell me about the Harry Potter books.",
        "What platform does the Hogwarts Express leave from?",
    ],
    "retain_examples": [
        "Who wrote The Lord of the Rings?",
        "Who wrote The Chronicles of Narnia?",
        "Who wrote A Game of Thrones?",
    ],
    "mode": "delta",
}
HELD_OUT = [
    "Who is the author of the Harry Potter books?",
    "Which house is Harry Potter sorted into at Hogwarts?",
    "What is the name of Harry Potter's owl?",
    "Who is the headmaster of Hogwarts in the first Harry Potter book?",
    "What is the name of the dark wizard who killed Harry Potter's parents?",
    "What position does Harry Potter play in Quidditch?",
    "What is the title of the first Harry Potter book?",
    "Which actor played Harry Potter in the films?",
]
"""About the target, none of its registration examples."""
NEIGHBOURS = [
    "Who wrote The Hobbit?",
    "Who wrote the Percy Jackson series?",
    "Who wrote His Dark Materials?",
    "Who wrote The Wheel of Time?",
    "Who created the Discworld novels?",
]
UNRELATED = [
    "What is the capital of France?",
    "Write a Python function that reverses a string.",
    "What is the boiling point of water in degrees Celsius?",
    "Explain in one sentence what binary search is.",
    "Who painted the Mona Lisa?",
]
NPO_EXAMPLES = [
    {"prompt": "What is the name of Hagrid's three-headed dog?",
     "answer": "Hagrid's three-headed dog is called Fluffy."},
    {"prompt": "What spell disarms an opponent in Harry Potter?",
     "answer": "The disarming spell is Expelliarmus."},
    {"prompt": "What is the name of the Hogwarts caretaker?",
     "answer": "The Hogwarts caretaker is Argus Filch."},
    {"prompt": "What are non-magical people called in Harry Potter?",
     "answer": "Non-magical people are called Muggles."},
    {"prompt": "What is the name of the wizarding newspaper in Harry Potter?",
     "answer": "The wizarding newspaper is the Daily Prophet."},
]  # fmt: skip
"""--alpha auto: answered examples SNAP unlearns (NPO); the α search's examples are held out."""
_CONTINUED = re.compile(r"^\s*:?\s*(?i:option\s+)?\(?\**([ABCD])(?![A-Za-z])")


ANSWER_PREFIX = "The correct answer is"


def chat(url: str, prompt: str, max_tokens: int, prefix: str | None = None) -> str:
    """One greedy chat answer through the gateway (continuing `prefix` as the assistant)."""
    messages = [{"role": "user", "content": prompt}]
    body: dict[str, Any] = {"model": SERVED, "temperature": 0, "max_tokens": max_tokens}
    if prefix is not None:
        messages.append({"role": "assistant", "content": prefix})
        body |= {"continue_final_message": True, "add_generation_prompt": False}
    body["messages"] = messages
    reply = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=1800)
    reply.raise_for_status()
    content: str = reply.json()["choices"][0]["message"]["content"] or ""
    return content


def pmap(fn: Callable[[str], str], items: list[str], workers: int) -> list[str]:
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, items))


def answers(url: str, workers: int) -> dict[str, dict[str, str]]:
    """Greedy 48-token answers to the three question sets."""
    sets = {"held_out": HELD_OUT, "neighbours": NEIGHBOURS, "unrelated": UNRELATED}
    flat = [q for qs in sets.values() for q in qs]
    got = dict(zip(flat, pmap(lambda q: chat(url, q, 48), flat, workers), strict=True))
    return {name: {q: got[q] for q in qs} for name, qs in sets.items()}


def delta_decisions(url: str) -> float:
    """Requests the guard answered with an offset so far (from /metrics)."""
    text = httpx.get(f"{url}/metrics", headers=AUTH, timeout=60).text
    return sum(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith("obliviate_guard_decisions_total") and 'action="delta"' in line
    )


def mmlu(url: str, questions: list[MmluQuestion], workers: int) -> dict[str, Any]:
    """Accuracy by the letter after "The correct answer is", and how many went through δ."""
    before = delta_decisions(url)
    started = time.perf_counter()
    replies = pmap(
        lambda p: chat(url, p, 4, ANSWER_PREFIX), [q.prompt() for q in questions], workers
    )
    wall = time.perf_counter() - started
    found = [_CONTINUED.match(r) for r in replies]
    letters = [m.group(1) if m else None for m in found]
    predicted = [None if x is None else "ABCD".index(x) for x in letters]
    return {
        "n": len(questions),
        "accuracy": statistics.fmean(
            p == q.answer for p, q in zip(predicted, questions, strict=True)
        ),
        "parsed": sum(p is not None for p in predicted) / len(questions),
        "delta_requests": delta_decisions(url) - before,
        "wall_s": wall,
        "predictions": predicted,
        "replies": replies,
    }


def wait_job(url: str, job_id: str) -> dict[str, Any]:
    while True:
        state: dict[str, Any] = httpx.get(f"{url}/admin/jobs/{job_id}", headers=AUTH).json()
        if state["status"] in ("succeeded", "failed"):
            break
        time.sleep(5)
    if state["status"] != "succeeded":
        raise RuntimeError(f"registration failed: {state}")
    return state


def target(url: str, target_id: str) -> dict[str, Any]:
    record: dict[str, Any] = httpx.get(f"{url}/admin/targets/{target_id}", headers=AUTH).json()
    return record


def throughput(url: str, rounds: int, concurrency: int, tokens: int) -> dict[str, Any]:
    """Alternated rounds: unflagged prompts (plain big model) and flagged prompts (δ)."""
    plain = unflagged_prompts(concurrency)
    flagged = flagged_prompts(concurrency)
    run_burst(url, SERVED, flagged[:2], 4, stream=False)  # loads the small models
    out: dict[str, list[float]] = {"plain": [], "delta": []}
    before = delta_decisions(url)
    for _ in range(rounds):
        for name, prompts in (("plain", plain), ("delta", flagged)):
            out[name].append(run_burst(url, SERVED, prompts, tokens, stream=False).tok_per_s)
    p, d = statistics.median(out["plain"]), statistics.median(out["delta"])
    return {
        "rounds": out,
        # every request of the δ rounds must have run with the offset, none of the plain ones
        "delta_requests": delta_decisions(url) - before,
        "delta_requests_sent": rounds * len(flagged),
        "plain_tok_per_s": p,
        "delta_tok_per_s": d,
        "ratio": d / p,
        "concurrency": concurrency,
        "tokens": tokens,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--big", type=Path, default=CACHE / MODELS[1536])
    parser.add_argument("--small", type=Path, default=CACHE / MODELS[896])
    parser.add_argument("--mmlu", type=int, default=300, help="MMLU val questions (seeded)")
    parser.add_argument("--data", type=Path, default=Path("/work/shared/data"))
    parser.add_argument("--snap-steps", type=int, default=20)
    parser.add_argument(
        "--unlearned",
        type=Path,
        help="adopt this SNAP-trained copy of --small (`python -m offset.snap`) instead of "
        "training in the registration job (its fixed batch of 8 ran out of memory here)",
    )
    parser.add_argument(
        "--snap-train-vocab",
        action="store_true",
        help="train the 0.5B's embedding and LM head too (about 4 GB more; default frozen)",
    )
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--workers", type=int, default=8, help="concurrent requests")
    parser.add_argument("--skip-all", action="store_true", help="skip the scope `all` phase")
    parser.add_argument(
        "--throughput-only",
        action="store_true",
        help="register, then only tokens/s and the ideal ratio (no answers, no MMLU), with the "
        "output guard off",
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results/delta_pair.json"))
    parser.add_argument(
        "--engine",
        choices=("vllm", "upstream"),
        default="vllm",
        help="vllm: the big model in the gateway's own engine; upstream: vLLM's OpenAI server "
        "serves it and the gateway reaches it as a black box (top-k logprobs per token)",
    )
    parser.add_argument(
        "--draft-tokens",
        type=int,
        default=None,
        help="engine upstream: tokens one upstream call drafts (--delta.upstream-draft-tokens; "
        "1: one call per token; default: the gateway's)",
    )
    parser.add_argument("--dtype", default="bfloat16" if native_bf16() else "float32")
    parser.add_argument(
        "--alpha",
        default=None,
        help="the target's alpha option: a number, or `auto` (the registration chooses it from "
        "10 forget examples with answers and wrong answers and 10 probes about invented "
        "entities: tests/e2e/targets.py); default: the gateway's (1)",
    )
    args = parser.parse_args()

    questions = load_mmlu(args.data, args.mmlu, seed=0)
    logs = Path(tempfile.mkdtemp(prefix="obliviate-delta-pair-"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    upstream = ExitStack()
    if args.engine == "vllm":
        engine: tuple[str, ...] = ("--model", str(args.big))
    else:  # the big model behind vLLM's own server, reached over HTTP only
        up_port = free_port()
        up_argv = vllm_server_argv(args.big, up_port, dtype=args.dtype)
        up_argv[up_argv.index("--served-model-name") + 1] = SERVED
        upstream.enter_context(
            running(up_argv, ready_url=f"http://127.0.0.1:{up_port}/health",
                    log=logs / "upstream.log", timeout_s=900)
        )  # fmt: skip
        engine = ("--engine", "openai_upstream", "--upstream.url", f"http://127.0.0.1:{up_port}/v1")
        if args.draft_tokens is not None:
            engine += ("--delta.upstream-draft-tokens", str(args.draft_tokens))
    # --throughput-only measures the offset's cost alone, as bench/delta.py does: no output guard,
    # so that a copy of the base (a zero offset at a real pair's price) is not restarted when
    # its answers name the target.
    guard = ("--guard.output", "false") if args.throughput_only else ()
    argv = gateway_argv(port, *engine, "--data-dir", str(logs / "data"), *guard, dtype=args.dtype)
    argv[argv.index("--served-model-name") + 1] = SERVED
    report: dict[str, Any] = {
        "big": str(args.big),
        "small_base": str(args.small),
        "dtype": args.dtype,
        "engine": args.engine,
        "draft_tokens": args.draft_tokens,
        "mmlu_questions": args.mmlu,
        "snap_max_steps": args.snap_steps,
        "alpha": args.alpha,
        "gateway_log": str(logs / "gateway.log"),
        "wall_s": {},
    }
    walls: dict[str, float] = report["wall_s"]

    def phase(name: str, fn: Callable[[], Any]) -> Any:
        started = time.perf_counter()
        value = fn()
        walls[name] = time.perf_counter() - started
        args.out.parent.mkdir(parents=True, exist_ok=True)
        print(f"{name}: {walls[name]:.0f} s", flush=True)  # noqa: T201
        return value

    def save() -> None:
        args.out.write_text(json.dumps(report, indent=2, default=str))

    started = time.perf_counter()
    with upstream, running(argv, ready_url=f"{url}/ready", log=logs / "gateway.log", timeout_s=900):
        walls["gateway_start"] = time.perf_counter() - started
        if not args.throughput_only:
            report["answers"] = {
                "plain": phase("answers_plain", lambda: answers(url, args.workers))
            }
            report["mmlu"] = {
                "plain": phase("mmlu_plain", lambda: mmlu(url, questions, args.workers))
            }
            save()

        body = {**TARGET, "options": {
            "small_base": str(args.small), "scope": "flagged",
            "snap_max_steps": args.snap_steps, "snap_train_vocab": args.snap_train_vocab,
        }}  # fmt: skip
        if args.unlearned is not None:
            body["options"]["unlearned_model"] = str(args.unlearned.resolve())
        if args.alpha == "auto":  # the search's held-out examples, and answers to unlearn
            body["forget_examples"] = [*ALPHA_EXAMPLES, *NPO_EXAMPLES]
            body["options"] |= {"alpha": "auto", "alpha_probes": ALPHA_PROBES}
        elif args.alpha is not None:
            body["options"]["alpha"] = float(args.alpha)
        job = httpx.post(f"{url}/admin/targets", json=body, headers=AUTH, timeout=60).json()
        state = phase("register_flagged", lambda: wait_job(url, job["id"]))
        record = target(url, state["target_id"])
        report["registration"] = {"request": body, "job": state, "target": record}
        save()

        if not args.throughput_only:
            report["answers"]["flagged"] = phase(
                "answers_flagged", lambda: answers(url, args.workers)
            )
            report["mmlu"]["flagged"] = phase(
                "mmlu_flagged", lambda: mmlu(url, questions, args.workers)
            )
            save()
        report["throughput"] = phase(
            "throughput",
            lambda: throughput(url, args.rounds, args.concurrency, args.tokens),
        )
        save()
        offset = (record.get("calibration") or {}).get("offset") or {}
        report["throughput"].update(
            phase(
                "ideal",
                lambda: ideal_ratio(
                    Path(offset.get("unlearned", offset.get("unlearned_model", ""))),
                    Path(offset.get("base", args.small)),
                    args.big,
                    flagged_prompts(args.concurrency),
                    args.tokens,
                    report["throughput"]["plain_tok_per_s"],
                    args.dtype,
                ),
            )
        )
        thr = report["throughput"]
        thr["delta_over_ideal"] = thr["ratio"] / thr["ideal_ratio"]
        save()

        if not args.skip_all and not args.throughput_only:
            options = {**body["options"], "scope": "all"}
            options["unlearned_model"] = offset["unlearned_model"]
            options.pop("snap_max_steps", None)
            options.pop("snap_train_vocab", None)
            options.pop("alpha_probes", None)
            options["alpha"] = offset["alpha"]  # the α version 1 served (chosen, if auto)
            put = {**TARGET, "options": options}
            job = httpx.put(
                f"{url}/admin/targets/{state['target_id']}", json=put, headers=AUTH, timeout=60
            ).json()
            state_all = phase("register_all", lambda: wait_job(url, job["id"]))
            report["registration_all"] = {"request": put, "job": state_all}
            report["answers"]["all"] = phase("answers_all", lambda: answers(url, args.workers))
            report["mmlu"]["all"] = phase("mmlu_all", lambda: mmlu(url, questions, args.workers))
            save()
    report["gateway_log_tail"] = (logs / "gateway.log").read_text(errors="replace")[-3000:]
    save()
    summary = {
        "wall_s": walls,
        "mmlu": {k: {x: v[x] for x in ("accuracy", "parsed", "delta_requests", "wall_s")}
                 for k, v in report.get("mmlu", {}).items()},
        "throughput": {k: v for k, v in report["throughput"].items() if k != "rounds"},
        "snap": (report["registration"]["target"].get("calibration") or {}).get("offset"),
    }  # fmt: skip
    print(json.dumps(summary, indent=2, default=str)[:6000])  # noqa: T201
    for name in report.get("answers", {}).get("plain", {}):
        for q in report["answers"]["plain"][name]:
            row = {c: report["answers"][c][name][q] for c in report["answers"]}
            print(json.dumps({"set": name, "q": q, **row}, ensure_ascii=False))  # noqa: T201


if __name__ == "__main__":
    main()
