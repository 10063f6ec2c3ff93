"""Where the gateway's time goes under the burst: py-spy samples of every process, by category.

Starts `obliviate serve` on the default model, registers `--targets` targets (bench/targets.py),
waits until it is idle, then records py-spy (`--subprocesses --threads --nonblocking`, raw
collapsed stacks) while `--rounds` bursts of `--concurrency` streamed chat requests run. The
samples are sorted into the categories of the request path (HTTP, JSON and pydantic, SSE
formatting, the guard's thread hop, the classifier, the engine client, ...) per process and
thread; CPU seconds per category are printed as a table and written with the raw stacks to
bench/results/profile-<targets>.{txt,md}.

    python bench/request_profile.py [--targets 0] [--rounds 2] [--concurrency 32] [--tokens 64]
                            [--no-stream] [--rate 100]

Needs py-spy (pip install py-spy) and ptrace rights over the gateway (root, or
kernel.yama.ptrace_scope = 0).
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.overhead import register_up_to  # noqa: E402
from bench.targets import wait_idle  # noqa: E402
from bench.workload import percentile, run_burst, unflagged_prompts  # noqa: E402
from offset.snap import native_bf16  # noqa: E402
from server.modelstore import resolve_model  # noqa: E402
from tests.e2e.servers import (  # noqa: E402
    MODEL_NAME,
    free_port,
    gateway_argv,
    running,
    vllm_server_argv,
)

# (category, substrings of a frame; the first rule with a frame matching wins, scanning the
# stack from the leaf up, so the innermost known layer takes the sample).
RULES: list[tuple[str, tuple[str, ...]]] = [
    ("classifier (guard thread)", ("classifier/",)),
    ("corruption (flagged prompts)", ("corruption/", "PromptCorruptor.corrupt")),
    ("chat template + tokenize", ("server/engine/templating.py", "tokenization_utils")),
    ("SSE / JSON formatting", ("server/services/formatting.py", "server/protocol/common.py")),
    ("request parsing (pydantic)", ("serialize_response", "_validate", "pydantic/")),
    ("vLLM output processing (detokenize)", ("vllm/v1/engine/output_processor.py",
                                              "vllm/v1/engine/detokenizer.py",
                                              "vllm/v1/engine/logprobs.py")),
    ("vLLM engine client (ZMQ, msgpack)", ("vllm/v1/engine/core_client.py",
                                            "vllm/v1/serial_utils.py", "zmq/")),
    ("vLLM request intake", ("vllm/v1/engine/async_llm.py", "vllm/v1/engine/processor.py",
                             "vllm/v1/engine/input_processor.py", "vllm/sampling_params.py")),
    ("gateway engine adapter", ("server/engine/vllm_local.py",)),
    ("generation service", ("server/services/generation.py",)),
    ("guard (event loop side)", ("server/services/guard.py", "server/services/failsafe.py")),
    ("middlewares", ("server/metrics.py", "server/logs.py", "server/limits.py",
                     "server/shutdown.py", "server/auth.py", "prometheus_client")),
    ("routes + cancellation", ("server/routes/",)),
    ("Starlette / FastAPI", ("starlette/", "fastapi/")),
    ("HTTP (uvicorn, httptools, h11)", ("uvicorn/", "httptools", "h11/")),
    ("asyncio / threads", ("asyncio/", "concurrent/futures", "threading.py")),
]  # fmt: skip


def categorise(frames: list[str]) -> str:
    for frame in reversed(frames):
        for category, needles in RULES:
            if any(n in frame for n in needles):
                return category
    return "other"


def summarise(raw: Path, rate: int, wall_s: float) -> tuple[str, dict[str, float]]:
    """Markdown table: CPU seconds per (process, thread kind, category)."""
    by: collections.Counter[tuple[str, str, str]] = collections.Counter()
    leaves: collections.Counter[tuple[str, str]] = collections.Counter()
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        procs = [f for f in frames if f.startswith("process ")]
        process = procs[-1] if procs else "process ?"  # children are nested in their parent
        name = "front end"  # the gateway, or vLLM's api_server
        if "EngineCore" in process:
            name = "vLLM EngineCore"
        elif "Worker" in process:
            name = "vLLM Worker"
        thread = next((f for f in frames if f.startswith("thread ")), "thread ?")
        kind = thread.split(": ", 1)[-1] if ": " in thread else "?"
        kind = "main" if kind == "MainThread" else kind.rstrip("_0123456789") or kind
        code = [f for f in frames if not f.startswith(("process ", "thread "))]
        category = categorise(code)
        by[(name, kind, category)] += int(count)
        if name == "front end" and code:
            leaves[(category, code[-1])] += int(count)
    seconds = {"/".join(k): v / rate for k, v in by.items()}
    rows = [
        f"py-spy, {rate} samples/s, {wall_s:.1f} s of burst; CPU seconds per category "
        "(share of the burst's wall time in brackets)",
        "",
        "| process | thread | category | CPU s | share of wall |",
        "|---|---|---|---|---|",
    ]
    for (name, kind, category), n in sorted(by.items(), key=lambda kv: -kv[1]):
        s = n / rate
        if s >= 0.05:
            rows.append(f"| {name} | {kind} | {category} | {s:.2f} | {100 * s / wall_s:.1f}% |")
    rows += ["", "Hottest leaf frames in the front-end process:", ""]
    rows += ["| category | frame | CPU s |", "|---|---|---|"]
    for (category, frame), n in leaves.most_common(25):
        rows.append(f"| {category} | `{frame[:110]}` | {n / rate:.2f} |")
    return "\n".join(rows) + "\n", seconds


def _cpu_seconds(pid: int) -> dict[str, float]:
    """user + system CPU seconds of the server process and of each child, by name."""
    import psutil

    root = psutil.Process(pid)
    out = {}
    for p in [root, *root.children(recursive=True)]:
        try:
            name = "front end" if p.pid == pid else p.name()
            times = p.cpu_times()
            out[name] = out.get(name, 0.0) + times.user + times.system
        except psutil.Error:
            continue
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--targets", type=int, default=0)
    parser.add_argument(
        "--server", choices=["obliviate", "vllm"], default="obliviate",
        help="profile vLLM's own OpenAI server instead (the same burst), for comparison",
    )  # fmt: skip
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--no-stream", dest="stream", action="store_false")
    parser.add_argument("--rate", type=int, default=100)
    parser.add_argument(
        "--native", action="store_true",
        help="native frames too (C extensions, the interpreter); py-spy then pauses the process",
    )  # fmt: skip
    parser.add_argument("--dtype", default="bfloat16" if native_bf16() else "float32")
    parser.add_argument("--out-dir", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))

    model = resolve_model(None, auto_pull=True)
    logs = Path(tempfile.mkdtemp(prefix="obliviate-profile-"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    if args.server == "vllm":
        argv, ready, tag = (
            vllm_server_argv(model, port, dtype=args.dtype),
            f"{url}/v1/models",
            "vllm",
        )
    else:
        argv = gateway_argv(
            port, "--model", str(model), "--data-dir", str(logs / "data"), dtype=args.dtype
        )
        ready, tag = f"{url}/ready", str(args.targets)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    raw = args.out_dir / f"profile-{tag}.txt"
    with running(argv, ready_url=ready, log=logs / "server.log") as proc:
        if args.server == "obliviate":
            register_up_to(url, 0, args.targets, {})
        wait_idle(proc.pid)
        run_burst(url, MODEL_NAME, unflagged_prompts(4), 8, stream=args.stream)
        recorder = subprocess.Popen(
            [spy, "record", "--pid", str(proc.pid), "--subprocesses", "--threads",
             *(["--native"] if args.native else ["--nonblocking"]),
             "--rate", str(args.rate), "--format", "raw", "--output", str(raw)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        time.sleep(2)  # py-spy attaches
        cpu_before = _cpu_seconds(proc.pid)
        started = time.perf_counter()
        latencies: list[float] = []
        for r in range(args.rounds):
            result = run_burst(
                url, MODEL_NAME, unflagged_prompts(args.concurrency, r + 1), args.tokens,
                stream=args.stream,
            )  # fmt: skip
            latencies += result.latencies
            print(f"{result.tok_per_s:.1f} tok/s", flush=True)
        wall = time.perf_counter() - started
        cpu_after = _cpu_seconds(proc.pid)
        os.kill(recorder.pid, signal.SIGINT)
        recorder.wait(timeout=60)
    table, _ = summarise(raw, args.rate, wall)
    who = "vLLM's own server" if args.server == "vllm" else f"obliviate, {args.targets} targets"
    head = (
        f"# Profile: {who}, {args.rounds} bursts of {args.concurrency} "
        f"{'streamed' if args.stream else 'plain'} requests x {args.tokens} tokens\n\n"
        f"Latency p50 {1000 * percentile(latencies, 0.5):.0f} ms, "
        f"load average at the end {os.getloadavg()}\n\n"
        "CPU seconds per process over the burst (psutil, user + system): "
        + ", ".join(
            f"{name} {cpu_after.get(name, 0.0) - cpu_before.get(name, 0.0):.1f}"
            for name in cpu_after
        )
        + f" (wall {wall:.1f} s)\n\n"
    )
    (args.out_dir / f"profile-{tag}.md").write_text(head + table)
    print(head + table)


if __name__ == "__main__":
    main()
