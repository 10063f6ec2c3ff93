"""CPU seconds per process and thread of vLLM's own server and of the gateway, over one burst.

Answers "is the gateway's serving path laid out like vLLM's?": both servers start side by side on
the default model (no target registered), each gets a full untimed burst, then `--rounds` rounds
alternate vLLM / obliviate, each `--concurrency` non-streamed chat requests of `--tokens` greedy
tokens. Per round it prints the wall time and the CPU seconds of every thread of the server's
process tree that used more than 0.2 s (vLLM's Worker and EngineCore, the front end's process).
Writes bench/results/process-layout.json.

    python bench/process_layout.py [--rounds 2] [--concurrency 32] [--tokens 64]
                                   [--dtype float32|bfloat16] [-- extra gateway args]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.targets import wait_idle  # noqa: E402
from bench.workload import run_burst, side_by_side, unflagged_prompts  # noqa: E402
from offset.snap import native_bf16  # noqa: E402
from server.modelstore import resolve_model  # noqa: E402
from tests.e2e.servers import MODEL_NAME  # noqa: E402

Threads = dict[tuple[int, int], tuple[str, str, float]]
"""(pid, tid) -> (process, thread name, CPU seconds so far)."""


def thread_times(pid: int) -> Threads:
    """CPU seconds of every thread of the process tree `pid`, with process and thread names."""
    root = psutil.Process(pid)
    out: Threads = {}
    for proc in [root, *root.children(recursive=True)]:
        try:
            process = " ".join(proc.cmdline()[:4])[-60:]
            for t in proc.threads():
                comm = Path(f"/proc/{proc.pid}/task/{t.id}/comm")
                name = comm.read_text().strip() if comm.is_file() else "?"
                out[(proc.pid, t.id)] = (process, name, t.user_time + t.system_time)
        except (psutil.Error, OSError):
            continue  # a thread or process that ended meanwhile
    return out


def measure(url: str, pid: int, args: argparse.Namespace) -> dict[str, Any]:
    """One burst: its wall time and the CPU seconds each thread spent during it."""
    wait_idle(pid)
    before = thread_times(pid)
    started = time.perf_counter()
    run_burst(url, MODEL_NAME, unflagged_prompts(args.concurrency), args.tokens, stream=False)
    wall = time.perf_counter() - started
    after = thread_times(pid)
    spent = [
        (cpu - before.get(key, (process, name, 0.0))[2], process, name)
        for key, (process, name, cpu) in after.items()
    ]
    spent.sort(reverse=True)
    return {
        "wall_s": wall,
        "cpu_s": sum(s for s, _, _ in spent),
        "threads": [
            {"cpu_s": round(s, 2), "thread": name, "process": process}
            for s, process, name in spent
            if s > 0.2
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16" if native_bf16() else "float32")
    parser.add_argument("--out", type=Path, default=Path("bench/results/process-layout.json"))
    parser.add_argument("gateway_args", nargs="*", help="extra `obliviate serve` arguments")
    args = parser.parse_args()

    model = resolve_model(None, auto_pull=True)
    logs = Path(tempfile.mkdtemp(prefix="obliviate-layout-"))
    rounds: list[dict[str, Any]] = []
    with side_by_side(model, args.dtype, logs, args.gateway_args) as (urls, pids):
        for side, url in urls.items():  # untimed warm-up
            wait_idle(pids[side])
            run_burst(
                url, MODEL_NAME, unflagged_prompts(args.concurrency), args.tokens, stream=False
            )
        for index in range(args.rounds):
            for side, url in urls.items():
                result = {"round": index, "server": side, **measure(url, pids[side], args)}
                rounds.append(result)
                print(f"== {side} round {index}: wall {result['wall_s']:.1f} s, "
                      f"CPU {result['cpu_s']:.1f} s")  # fmt: skip
                for t in result["threads"]:
                    print(f"   {t['cpu_s']:6.1f}  {t['thread']:16s} {t['process']}")
    report = {
        "workload": {"concurrency": args.concurrency, "tokens": args.tokens, "dtype": args.dtype,
                     "model": MODEL_NAME, "gateway_args": args.gateway_args},
        "rounds": rounds,
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
