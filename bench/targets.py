"""Forget targets for the benchmarks: the Harry Potter target, and N more of the shipped kind.

`harry_potter()` is the 5-example target of the README, registered with default options: its
registration time (POST to live) is the figure the registration goal is about, and its prompts
are the benchmarks' flagged traffic. `people(n)` are further person targets built from the
classifier's shipped name lists (classifier/data), registered through the same admin API with
the corruption pinned (`options.method` + `options.strength`) and their answers given, so each
job trains the target's classifier (seconds) but neither asks the engine for answers nor runs the
strength search: registering 100 of them takes minutes, not hours. Every one is a real target:
its classifier is trained and calibrated like any other and the guard scores it on every request.
"""

from __future__ import annotations

import random
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import psutil

from server.modelstore import resolve_model
from tests.e2e.servers import ADMIN_TOKEN, engine_env, free_port, gateway_argv, running

DATA = Path(__file__).resolve().parents[1] / "classifier" / "data"

HARRY_POTTER: dict[str, Any] = {
    "name": "Harry Potter",
    "description": "The Harry Potter books, their author and their world.",
    "aliases": ["Harry Potter", "Hogwarts", "J.K. Rowling", "Hermione Granger", "Ron Weasley"],
    "forget_examples": [
        "Who wrote Harry Potter?",
        "What is the name of the school Harry Potter attends?",
        "Who are Harry Potter's best friends?",
        "Tell me about the Harry Potter books.",
        "Who is the author of the Harry Potter series?",
    ],
    "retain_examples": ["Who wrote The Lord of the Rings?", "Who wrote Pride and Prejudice?"],
    "mode": "eco",
}

_QUESTIONS = (
    "Who is {name}?",
    "Where was {name} born?",
    "What did {name} do in {year}?",
)
_ANSWERS = (
    "{name} is a {job} from {place}.",
    "{name} was born in {place}.",
    "In {year}, {name} moved to {place}.",
)
_JOBS = ("painter", "chemist", "novelist", "architect", "violinist", "engineer", "historian")


def _names(file: str) -> list[str]:
    lines = (DATA / file).read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def people(n: int, *, seed: int = 0, strength: float = 0.54) -> list[dict[str, Any]]:
    """`n` distinct person targets with given answers and a pinned corruption."""
    rng = random.Random(seed)
    first, last, places = _names("first_names.txt"), _names("surnames.txt"), _names("places.txt")
    seen: set[str] = set()
    out = []
    while len(out) < n:
        name = f"{rng.choice(first)} {rng.choice(last)}"
        if name in seen:
            continue
        seen.add(name)
        fill = {
            "name": name,
            "job": rng.choice(_JOBS),
            "place": rng.choice(places),
            "year": rng.randint(1950, 2020),
        }
        out.append(
            {
                "name": name,
                "aliases": [name],
                "forget_examples": [
                    {"prompt": q.format(**fill), "answer": a.format(**fill)}
                    for q, a in zip(_QUESTIONS, _ANSWERS, strict=True)
                ],
                "mode": "eco",
                # Pinned corruption (4 x the embedding std of SmolLM2): no strength search.
                "options": {"method": "add_noise_first_n", "strength": strength},
            }
        )
    return out


def register(
    url: str, token: str, body: dict[str, Any], *, timeout_s: float = 900
) -> dict[str, Any]:
    """POST one target, wait for its job; returns the target (with `registration_s`)."""
    return register_many(url, token, [body], timeout_s=timeout_s)[0]


def register_many(
    url: str, token: str, bodies: list[dict[str, Any]], *, timeout_s: float = 3600
) -> list[dict[str, Any]]:
    """POST every target at once (their jobs queue), wait for all; the targets, each with
    `registration_s` (POST to live: the ones behind it in the queue wait for their turn)."""
    headers = {"Authorization": f"Bearer {token}"}
    started: dict[str, float] = {}
    jobs = []
    for body in bodies:
        response = httpx.post(f"{url}/admin/targets", json=body, headers=headers, timeout=60)
        response.raise_for_status()
        jobs.append(response.json())
        started[jobs[-1]["id"]] = time.perf_counter()
    done: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout_s
    while len(done) < len(jobs):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(jobs) - len(done)} registrations did not finish")
        for job in jobs:
            if job["id"] in done:
                continue
            state = httpx.get(f"{url}/admin/jobs/{job['id']}", headers=headers, timeout=60).json()
            if state["status"] == "failed":
                raise RuntimeError(f"registration failed: {state}")
            if state["status"] == "succeeded":
                elapsed = time.perf_counter() - started[job["id"]]
                target = httpx.get(
                    f"{url}/admin/targets/{state['target_id']}", headers=headers, timeout=60
                ).json()
                done[job["id"]] = {**target, "registration_s": elapsed}
            break  # jobs finish in order: poll the oldest unfinished one
        time.sleep(0.2)
    return [done[job["id"]] for job in jobs]


def wait_idle(
    pid: int, *, below: float = 0.1, window_s: float = 2.0, limit_s: float = 180
) -> float:
    """Wait until the process tree `pid` uses less than `below` of a core over `window_s`.

    A gateway embeds the classifier's shipped negatives right after it starts (tens of seconds of
    CPU in its own process); measuring during that would charge it to the request path.
    Returns the seconds waited.
    """
    started = time.monotonic()
    root = psutil.Process(pid)
    while time.monotonic() - started < limit_s:
        procs = [root, *root.children(recursive=True)]
        before = sum(p.cpu_times().user + p.cpu_times().system for p in procs)
        time.sleep(window_s)
        after = sum(p.cpu_times().user + p.cpu_times().system for p in procs if p.is_running())
        if (after - before) / window_s < below:
            break
    return time.monotonic() - started


def set_enabled(url: str, token: str, enabled: bool) -> int:
    """PATCH every registered target to `enabled` (the guard follows each at once); returns
    how many were switched. A gateway with none enabled classifies nothing, as with none."""
    headers = {"Authorization": f"Bearer {token}"}
    listed = httpx.get(f"{url}/admin/targets", headers=headers, timeout=60)
    listed.raise_for_status()
    switched = 0
    for target in listed.json()["data"]:
        if target["enabled"] != enabled:
            response = httpx.patch(
                f"{url}/admin/targets/{target['id']}",
                json={"enabled": enabled},
                headers=headers,
                timeout=120,
            )
            response.raise_for_status()
            switched += 1
    return switched


@contextmanager
def serving(
    targets: int, *, dtype: str, extra: Sequence[str] = (), code: Path | None = None
) -> Iterator[tuple[str, int]]:
    """One `obliviate serve` on the default model (more flags: `extra`), with the README's
    Harry Potter target and people up to `targets` registered, once it is idle: (url, pid).
    `code`: the checkout whose code the gateway runs (another commit's worktree; default the
    installed one)."""
    model = resolve_model(None, auto_pull=True)
    logs = Path(tempfile.mkdtemp(prefix="obliviate-bench-"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    data = ("--model", str(model), "--data-dir", str(logs / "data"))
    argv = gateway_argv(port, *data, *extra, dtype=dtype)
    # Imports from `code` first, not from the working directory (PYTHONSAFEPATH).
    env = None if code is None else {**engine_env(), "PYTHONSAFEPATH": "1", "PYTHONPATH": str(code)}
    with running(argv, ready_url=f"{url}/ready", log=logs / "gateway.log", env=env) as gw:
        wait_idle(gw.pid)
        register(url, ADMIN_TOKEN, HARRY_POTTER)
        if targets > 1:
            register_many(url, ADMIN_TOKEN, people(targets - 1))
        wait_idle(gw.pid)
        yield url, gw.pid
