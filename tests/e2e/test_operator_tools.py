"""The operator's side on the real engine: the web console in a real headless Chromium, and the
`obliviate targets` CLI, both against the session's gateway (real vLLM, real classifier).

Console: log in, register a target from the form, watch its job's stages live until it is active,
try a prompt in the playground (flagged, spans marked, bare and guarded answers side by side),
see it counted on the activity page (audit entry without prompt text), disable the target and see
the prompt pass, delete it with confirmation. CLI: add from a YAML file and follow the job, then
list, show, classify, threshold, disable, enable, jobs, wait, rm, with their exit codes.

Screenshots of every page go to $OBLIVIATE_SCREENSHOTS (default: a temporary folder); timings and
what the operator saw while a registration ran go to timings.json beside them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.protocol.admin import CreateTargetRequest
from tests.console.browser import browser_page, chromium_path, screenshot
from tests.e2e.conftest import Server
from tests.e2e.servers import ADMIN_TOKEN

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
FACTS = ("rowling", "hogwarts", "hermione", "weasley", "gryffindor", "dumbledore")
PROMPT = "Who wrote Harry Potter?"
CONSOLE_TARGET = {
    "Name": "Harry Potter",
    "Aliases": "Harry Potter\nHogwarts\nJ.K. Rowling\nHermione Granger\nRon Weasley",
    "Prompts to forget": "\n".join(
        [
            "Who is the author of the Harry Potter books?",
            "What is the name of the school Harry Potter attends?",
            "Who are Harry Potter's best friends?",
            "Tell me about the Harry Potter books.",
        ]
    ),
    "Prompts to keep answering": "Who wrote The Lord of the Rings?\nWho wrote Pride and Prejudice?",
}
CLI_TARGET_YAML = """\
name: Sherlock Holmes
description: The detective stories of Arthur Conan Doyle.
aliases: [Sherlock Holmes, Dr. Watson, Baker Street, Arthur Conan Doyle]
forget_examples:
  - Who wrote the Sherlock Holmes stories?
  - {prompt: "Where does Sherlock Holmes live?", answer: At 221B Baker Street in London.}
  - {prompt: "Who is Sherlock Holmes's friend and assistant?", answer: Dr. John Watson.}
retain_examples:
  - Who wrote Murder on the Orient Express?
"""


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = os.environ.get("OBLIVIATE_SCREENSHOTS")
    return Path(folder) if folder else tmp_path_factory.mktemp("screenshots")


@pytest.fixture(scope="module")
def timings(shots: Path) -> Iterator[dict[str, Any]]:
    record: dict[str, Any] = {}
    yield record
    shots.mkdir(parents=True, exist_ok=True)
    (shots / "timings.json").write_text(json.dumps(record, indent=2))


@pytest.fixture(scope="module")
def page(gateway: Server) -> Iterator[Any]:
    if chromium_path() is None:
        if os.environ.get("CI"):
            pytest.fail("no chromium in CI: scripts/setup.sh installs Debian's chromium")
        pytest.skip("no chromium: run scripts/setup.sh (Debian package chromium)")
    pytest.importorskip("playwright")
    with browser_page() as p:
        p.set_default_timeout(30_000)
        yield p


def _cli_env(gateway: Server, token: str = ADMIN_TOKEN) -> dict[str, str]:
    return {**os.environ, "OBLIVIATE_URL": gateway.url, "OBLIVIATE_ADMIN_TOKEN": token}


def _target(gateway: Server, name: str) -> dict[str, Any] | None:
    targets = httpx.get(f"{gateway.url}/admin/targets", headers=AUTH).json()["data"]
    return next((t for t in targets if t["name"] == name), None)


JOB_STATE = """() => {
  const box = document.querySelector("#job-status");
  const current = box.querySelector("li[aria-current='step']");
  return {
    status: box.dataset.status,
    stage: current ? current.dataset.stage : "",
    progress: box.querySelector("progress").getAttribute("value"),
  };
}"""


@pytest.fixture(scope="module")
def registered(
    gateway: Server, page: Any, shots: Path, timings: dict[str, Any]
) -> Iterator[dict[str, Any]]:
    """Log in with the keyboard, register from the form, watch the job page until it ends."""
    existing = _target(gateway, "Harry Potter")
    if existing is not None:  # the session's shared target (conftest hp_target): ours replaces it
        httpx.delete(f"{gateway.url}/admin/targets/{existing['id']}", headers=AUTH)
    console = f"{gateway.url}/admin/console"
    page.goto(f"{console}/targets")
    assert "/admin/console/login" in page.url  # no session yet: sent to the login form
    screenshot(page, shots, "console-login")
    page.keyboard.type(ADMIN_TOKEN)  # the token field has the focus
    page.keyboard.press("Enter")
    page.wait_for_url(f"{console}/targets")
    assert ADMIN_TOKEN not in page.url
    cookie = next(c for c in page.context.cookies() if c["name"] == "obliviate_console")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert ADMIN_TOKEN not in cookie["value"]

    page.get_by_role("link", name="Register a target").click()
    for label, value in CONSOLE_TARGET.items():
        page.get_by_label(label, exact=True).fill(value)
    screenshot(page, shots, "console-register")
    started = time.monotonic()
    page.get_by_role("button", name="Register").click()
    page.wait_for_url(f"{console}/jobs/*")
    page.evaluate("window.__sameDocument = true")  # gone if the page reloads instead of polling
    # An operator at a terminal follows the same job with `obliviate targets wait`.
    job_id = page.url.rsplit("/", 1)[1]
    waiting = subprocess.Popen(
        [sys.executable, "-m", "server", "targets", "wait", job_id],
        env=_cli_env(gateway),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    seen: list[dict[str, Any]] = []
    status = ""
    while status not in ("succeeded", "failed"):
        assert time.monotonic() - started < 600, seen
        state = page.evaluate(JOB_STATE)  # one read of the DOM that htmx keeps swapping
        status, stage = state["status"], state["stage"]
        if not seen or (seen[-1]["status"], seen[-1]["stage"]) != (status, stage):
            seen.append({"s": round(time.monotonic() - started, 1), **state})
            if stage == "corruption":
                screenshot(page, shots, "console-job-running")
        time.sleep(0.5)
    timings["console_registration_s"] = round(time.monotonic() - started, 1)
    timings["console_job_page"] = seen
    wait_out, wait_err = waiting.communicate(timeout=120)
    timings["cli_wait_output"] = wait_out.splitlines()
    assert page.evaluate("window.__sameDocument") is True
    screenshot(page, shots, "console-job")
    assert status == "succeeded", page.locator("#job-status").inner_text()
    target = _target(gateway, "Harry Potter")
    assert target is not None and target["active"]
    yield {
        "target": target,
        "stages": seen,
        "wait": (waiting.returncode, wait_out, wait_err),
    }
    if _target(gateway, "Harry Potter") is not None:
        httpx.delete(f"{gateway.url}/admin/targets/{target['id']}", headers=AUTH)


def test_the_job_page_followed_the_stages_live(
    gateway: Server, page: Any, registered: dict[str, Any]
) -> None:
    seen = registered["stages"]
    # The strength search is the long stage (tens of seconds): the page showed it as current.
    assert "corruption" in [s["stage"] for s in seen], seen
    assert seen[-1]["status"] == "succeeded" and seen[-1]["progress"] == "1.0"
    progress = [float(s["progress"]) for s in seen]
    assert progress == sorted(progress), seen
    done = page.locator("#job-status li.stage-done")
    assert done.evaluate_all("items => items.map(i => i.dataset.stage)") == [
        "classifier",
        "answers",
        "corruption",
        "activate",
    ]


def test_targets_page_shows_the_calibration(
    gateway: Server, page: Any, registered: dict[str, Any], shots: Path
) -> None:
    target = registered["target"]
    page.goto(f"{gateway.url}/admin/console/targets")
    row = page.locator(f"#target-{target['id']}")
    cells = row.locator("td").all_inner_texts()
    report = target["calibration"]["classifier"]
    assert cells[0] == "active" and cells[1] == "eco" and cells[2] == "1"
    assert cells[3] == f"{target['threshold']:.3f}"
    assert cells[4] == f"{report['heldout_recall'] * 100:.1f}%"
    assert cells[5].startswith(f"{report['heldout_fpr'] * 100:.2f}%")
    strength = target["calibration"]["corruption"]["spec"]["strength"]
    assert cells[6].startswith(f"{strength:.3f}")
    screenshot(page, shots, "console-targets")
    row.get_by_role("link", name="Harry Potter", exact=True).click()
    assert page.get_by_role("heading", name="Calibration").is_visible()
    screenshot(page, shots, "console-target")


def test_playground_flags_the_prompt_and_shows_both_answers(
    gateway: Server, page: Any, registered: dict[str, Any], shots: Path
) -> None:
    page.goto(f"{gateway.url}/admin/console/playground")
    page.get_by_label("Prompt or conversation").fill(PROMPT)
    page.get_by_role("button", name="Classify and answer").click()
    guarded = page.locator("#guarded-answer")
    guarded.wait_for(timeout=120_000)
    assert page.get_by_role("heading", name="Flagged: Harry Potter").is_visible()
    assert page.locator("#result blockquote.classified mark").all_inner_texts() == ["Harry Potter"]
    row = page.locator("#result tbody tr").filter(has_text="Harry Potter")
    assert "flagged" in row.inner_text()
    bare = page.locator("#bare-answer").inner_text().lower()
    assert any(f in bare for f in FACTS), bare  # the model knows it ...
    assert not any(f in guarded.inner_text().lower() for f in FACTS), guarded.inner_text()
    screenshot(page, shots, "console-playground")


def test_activity_counts_the_flagged_request_without_its_text(
    gateway: Server, page: Any, registered: dict[str, Any], shots: Path
) -> None:
    target = registered["target"]
    page.goto(f"{gateway.url}/admin/console/activity")
    row = page.locator(f"#activity-{target['id']}")
    assert row.locator("td.count").inner_text() == "1"  # the playground's one guarded request
    assert "corrupt 1" in row.inner_text()
    audit = page.locator("table.audit tbody tr").filter(has_text="playground-")
    assert audit.count() == 1 and "Harry Potter" in audit.inner_text()
    assert PROMPT not in page.content()
    screenshot(page, shots, "console-activity")


def test_disabled_target_lets_the_prompt_pass(
    gateway: Server, page: Any, registered: dict[str, Any], shots: Path
) -> None:
    target = registered["target"]
    page.goto(f"{gateway.url}/admin/console/targets")
    page.get_by_role("button", name="Disable Harry Potter").click()
    row = page.locator(f"#target-{target['id']}")
    row.get_by_role("button", name="Enable Harry Potter").wait_for()  # swapped in place
    assert "disabled" in row.inner_text()
    assert (
        httpx.get(f"{gateway.url}/admin/targets/{target['id']}", headers=AUTH).json()["enabled"]
        is False
    )
    page.goto(f"{gateway.url}/admin/console/playground")
    page.get_by_label("Prompt or conversation").fill(PROMPT)
    page.get_by_role("button", name="Classify and answer").click()
    page.locator("#guarded-answer").wait_for(timeout=120_000)
    assert page.get_by_role("heading", name="Passes: no target flagged").is_visible()
    # Unflagged requests are served exactly as the bare engine serves them.
    bare = page.locator("#bare-answer").inner_text()
    assert page.locator("#guarded-answer").inner_text() == bare
    assert any(f in bare.lower() for f in FACTS)


def test_delete_asks_for_confirmation(
    gateway: Server, page: Any, registered: dict[str, Any], shots: Path
) -> None:
    target = registered["target"]
    page.goto(f"{gateway.url}/admin/console/jobs")
    screenshot(page, shots, "console-jobs")
    page.goto(f"{gateway.url}/admin/console/targets")
    page.get_by_role("link", name="Delete Harry Potter").click()
    assert _target(gateway, "Harry Potter") is not None  # a link alone deletes nothing
    page.get_by_role("button", name="Delete “Harry Potter”").click()
    assert page.get_by_role("status").inner_text().startswith("Deleted “Harry Potter”")
    response = httpx.get(f"{gateway.url}/admin/targets/{target['id']}", headers=AUTH)
    assert response.status_code == 404


# --- the CLI --------------------------------------------------------------------------------


def obliviate(
    gateway: Server, *args: str, token: str = ADMIN_TOKEN
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "server", "targets", *args],
        env=_cli_env(gateway, token),
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=900,
    )


def as_json(result: subprocess.CompletedProcess[str]) -> Any:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_cli_wait_followed_the_same_job(registered: dict[str, Any]) -> None:
    code, out, err = registered["wait"]
    assert code == 0, err
    lines = out.splitlines()
    stages = [line.split()[-2] for line in lines[:-1] if line.split()]
    assert "corruption" in stages and stages[-1] == "done", lines  # it saw the long stage
    assert lines[-1].startswith("✓ Harry Potter is active (version 1): threshold ")


@pytest.fixture(scope="module")
def cli_target(
    gateway: Server,
    registered: dict[str, Any],
    tmp_path_factory: pytest.TempPathFactory,
    timings: dict[str, Any],
) -> Iterator[dict[str, Any]]:
    """Registered with the CLI. The strength search (the long part, followed live above) is
    skipped by pinning the corruption to the one just calibrated for the console's target."""
    spec = registered["target"]["calibration"]["corruption"]["spec"]
    path = tmp_path_factory.mktemp("cli") / "sherlock.yaml"
    path.write_text(CLI_TARGET_YAML)
    started = time.monotonic()
    result = obliviate(
        gateway, "add", "--file", str(path), "--wait",
        "--option", f"method={spec['method']}", "--option", f"strength={spec['strength']}",
    )  # fmt: skip
    timings["cli_registration_s"] = round(time.monotonic() - started, 1)
    timings["cli_output"] = result.stdout.splitlines()
    assert result.returncode == 0, result.stdout + result.stderr
    target = _target(gateway, "Sherlock Holmes")
    assert target is not None
    yield {"target": target, "stdout": result.stdout}
    if _target(gateway, "Sherlock Holmes") is not None:
        httpx.delete(f"{gateway.url}/admin/targets/{target['id']}", headers=AUTH)


def test_cli_add_follows_the_job_to_the_end(cli_target: dict[str, Any]) -> None:
    lines = cli_target["stdout"].splitlines()
    assert lines[0].startswith("Registering: job ")
    stages = [line.split()[-2] for line in lines[1:-1] if line.split()]
    assert stages[-1] == "done", lines
    assert lines[-1].startswith("✓ Sherlock Holmes is active (version 1)")
    target = cli_target["target"]
    assert target["mode"] == "eco" and target["active"]
    assert target["description"] == "The detective stories of Arthur Conan Doyle."
    assert target["aliases"] == [
        "Sherlock Holmes",
        "Dr. Watson",
        "Baker Street",
        "Arthur Conan Doyle",
    ]
    assert target["n_forget_examples"] == 3 and target["n_retain_examples"] == 1
    assert target["calibration"]["corruption"]["searched"] is False  # the pinned options arrived


def test_cli_manages_the_target(gateway: Server, cli_target: dict[str, Any]) -> None:
    target_id = cli_target["target"]["id"]
    listed = as_json(obliviate(gateway, "list", "--json"))["data"]
    assert [t["id"] for t in listed if t["name"] == "Sherlock Holmes"] == [target_id]
    shown = as_json(obliviate(gateway, "show", "sherlock holmes", "--json"))
    assert shown["id"] == target_id and shown["calibration"]["classifier"]["heldout_recall"] > 0

    question = "Who lives at 221B Baker Street with Sherlock Holmes?"
    verdict = as_json(obliviate(gateway, "classify", question, "--json"))
    mine = next(r for r in verdict["results"] if r["target_id"] == target_id)
    assert mine["flagged"] and {s["text"] for s in mine["spans"]} >= {"Sherlock Holmes"}
    human = obliviate(gateway, "classify", question)
    assert human.returncode == 0 and "FLAGGED: Sherlock Holmes" in human.stdout

    raised = as_json(obliviate(gateway, "threshold", "Sherlock Holmes", "0.9999", "--json"))
    assert raised["threshold_override"] == 0.9999 and raised["threshold"] == pytest.approx(0.9999)
    restored = as_json(obliviate(gateway, "threshold", target_id, "calibrated", "--json"))
    assert restored["threshold_override"] is None
    assert restored["threshold"] == pytest.approx(cli_target["target"]["threshold"])

    assert as_json(obliviate(gateway, "disable", "Sherlock Holmes", "--json"))["active"] is False
    passes = as_json(obliviate(gateway, "classify", question, "--json"))
    assert all(r["target_id"] != target_id for r in passes["results"])
    assert as_json(obliviate(gateway, "enable", "Sherlock Holmes", "--json"))["active"] is True
    again = as_json(obliviate(gateway, "classify", question, "--json"))
    assert any(r["target_id"] == target_id and r["flagged"] for r in again["results"])

    jobs = as_json(obliviate(gateway, "jobs", "--target", "Sherlock Holmes", "--json"))["data"]
    assert [j["status"] for j in jobs] == ["succeeded"]
    waited = as_json(obliviate(gateway, "wait", jobs[0]["id"], "--json"))
    assert waited["job"]["status"] == "succeeded" and waited["target"]["id"] == target_id

    refused = obliviate(gateway, "rm", "Sherlock Holmes")  # stdin is not a terminal
    assert refused.returncode == 2 and "--yes" in refused.stderr
    assert obliviate(gateway, "rm", "Sherlock Holmes", "--yes").returncode == 0
    gone = obliviate(gateway, "show", target_id)
    assert gone.returncode == 1 and "404" in gone.stderr


def test_cli_exit_codes(gateway: Server) -> None:
    denied = obliviate(gateway, "list", token="not-the-admin-token-at-all")
    assert denied.returncode == 1 and "401" in denied.stderr
    missing = obliviate(gateway, "wait", "no-such-job")
    assert missing.returncode == 1 and "404" in missing.stderr
    bad = obliviate(gateway, "add", "--name", "Nobody", "--example", "Who?", "--mode", "nope")
    assert bad.returncode == 2


def test_cli_sends_the_tenant_scope(gateway: Server) -> None:
    """`--tenant` / `--api-key` travel as the request's `scope`; refused clearly until the
    gateway knows per-tenant targets, accepted once it does."""
    result = obliviate(
        gateway, "add", "--name", "Scoped", "--example", "Who is Scoped?", "--tenant", "acme",
        "--api-key", "key-1", "--json",
    )  # fmt: skip
    if "scope" in CreateTargetRequest.model_fields:
        job = as_json(result)
        httpx.delete(f"{gateway.url}/admin/targets/{job['target_id']}", headers=AUTH)
    else:
        assert result.returncode == 1
        assert "400" in result.stderr and "param: scope" in result.stderr
