"""The console's pages and the operators' JSON endpoints on the fake engine (fast).

Targets are written straight into the gateway's registry (as another gateway would), so no
training runs here; registering, calibrating and guarding on the real engine, in a real browser,
is tests/e2e/test_operator_tools.py.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from html.parser import HTMLParser

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.engine.fake import FakeEngine
from server.registry import Registry
from server.settings import JobsSettings, Settings
from tests.conftest import ADMIN_TOKEN

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    root = tmp_path_factory.mktemp("console")
    return Settings(
        data_dir=root / "data",
        model_cache_dir=root / "models",
        admin_token=ADMIN_TOKEN,
        jobs=JobsSettings(poll_interval=3600),  # rows added behind its back stay queued
    )


@pytest.fixture(scope="module")
def client(settings: Settings) -> Iterator[TestClient]:
    app = create_app(settings, engine=FakeEngine())
    with TestClient(app, follow_redirects=False) as test_client:
        response = test_client.post("/admin/console/login", data={"token": ADMIN_TOKEN})
        assert response.status_code == 303
        yield test_client


@pytest.fixture(scope="module")
def csrf(client: TestClient) -> str:
    page = client.get("/admin/console/register").text
    match = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert match is not None
    return match.group(1)


@pytest.fixture(scope="module")
def registry(settings: Settings) -> Iterator[Registry]:
    """The gateway's registry database, opened as another gateway would open it."""
    reg = Registry(settings.registry_location())
    yield reg
    reg.close()


def add_pending(registry: Registry, name: str) -> tuple[str, str]:
    target, job = registry.create_target(
        name=name,
        description="For the console tests.",
        aliases=[name, f"{name} Jr."],
        forget_examples=['["Who is it?", null]'],
        retain_examples=["Who is someone else?"],
        mode="eco",
        options={},
    )
    return target.id, job.id


class Labels(HTMLParser):
    """Form controls, and the ids that a <label for=...> names."""

    def __init__(self) -> None:
        super().__init__()
        self.controls: list[dict[str, str | None]] = []
        self.labelled: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "label" and a.get("for"):
            self.labelled.add(str(a["for"]))
        if tag in ("input", "textarea", "select") and a.get("type") not in ("hidden", "radio"):
            self.controls.append(a)


def test_every_form_control_has_a_label(client: TestClient) -> None:
    for path in ("/admin/console/register", "/admin/console/playground"):
        page = client.get(path)
        assert page.status_code == 200
        parser = Labels()
        parser.feed(page.text)
        assert parser.controls, path
        for control in parser.controls:
            assert control.get("id") in parser.labelled, (path, control)


def test_pages_carry_security_headers_and_no_inline_script(client: TestClient) -> None:
    page = client.get("/admin/console/targets")
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert page.headers["x-frame-options"] == "DENY"
    assert page.headers["cache-control"] == "no-store"
    assert re.search(r"<script(?![^>]*\bsrc=)", page.text) is None
    assert "style=" not in page.text


def test_targets_page_follows_pending_targets(client: TestClient, registry: Registry) -> None:
    target_id, _ = add_pending(registry, "Pending Person")
    page = client.get("/admin/console/targets")
    assert page.status_code == 200
    row = re.search(rf'<tr id="target-{target_id}".*?</tr>', page.text, re.S)
    assert row is not None and "pending" in row.group(0) and "not yet" in row.group(0)
    # The rows poll themselves while a target is training, and stop once none is.
    assert 'hx-get="/admin/console/targets?partial=rows"' in page.text
    rows = client.get("/admin/console/targets?partial=rows")
    assert rows.text.lstrip().startswith('<tbody id="target-rows"')
    detail = client.get(f"/admin/console/targets/{target_id}")
    assert "Pending Person Jr." in detail.text and target_id in detail.text


def test_enable_disable_and_threshold(client: TestClient, registry: Registry, csrf: str) -> None:
    target_id, _ = add_pending(registry, "Switched Person")
    row = client.post(
        f"/admin/console/targets/{target_id}/enabled",
        data={"enabled": "false"},
        headers={"HX-Request": "true", "X-CSRF-Token": csrf},
    )
    assert row.status_code == 200 and row.text.lstrip().startswith(f'<tr id="target-{target_id}"')
    assert registry.get_target(target_id).enabled is False  # type: ignore[union-attr]
    back = client.post(
        f"/admin/console/targets/{target_id}/enabled",
        data={"enabled": "true", "csrf_token": csrf, "back": f"/admin/console/targets/{target_id}"},
    )
    assert back.status_code == 303 and back.headers["location"].endswith(target_id)
    assert registry.get_target(target_id).enabled is True  # type: ignore[union-attr]
    client.post(
        f"/admin/console/targets/{target_id}/threshold",
        data={"threshold": "0.97", "csrf_token": csrf},
    )
    assert registry.get_target(target_id).threshold_override == 0.97  # type: ignore[union-attr]
    client.post(
        f"/admin/console/targets/{target_id}/threshold",
        data={"restore": "1", "csrf_token": csrf},
    )
    assert registry.get_target(target_id).threshold_override is None  # type: ignore[union-attr]
    bad = client.post(
        f"/admin/console/targets/{target_id}/threshold",
        data={"threshold": "1.5", "csrf_token": csrf},
    )
    assert bad.status_code == 400 and "threshold" in bad.text


def test_delete_needs_the_confirmation_form(
    client: TestClient, registry: Registry, csrf: str
) -> None:
    target_id, _ = add_pending(registry, "Doomed Person")
    confirm = client.get(f"/admin/console/targets/{target_id}/delete")
    assert confirm.status_code == 200 and "Delete “Doomed Person”" in confirm.text
    assert registry.get_target(target_id) is not None
    done = client.post(f"/admin/console/targets/{target_id}/delete", data={"csrf_token": csrf})
    assert done.status_code == 303
    assert done.headers["location"] == "/admin/console/targets?deleted=Doomed%20Person"
    assert registry.get_target(target_id) is None
    notice = client.get(done.headers["location"])
    assert "Deleted “Doomed Person”" in notice.text


def test_unknown_target_gets_an_html_page_and_the_api_keeps_json(client: TestClient) -> None:
    page = client.get("/admin/console/targets/nope")
    assert page.status_code == 404 and page.headers["content-type"].startswith("text/html")
    assert "No target nope" in page.text
    api = client.get("/admin/targets/nope", headers=AUTH)
    assert api.status_code == 404 and api.json()["error"]["param"] == "target_id"


def test_register_form_refuses_what_the_api_refuses(
    client: TestClient, registry: Registry, csrf: str
) -> None:
    empty = client.post(
        "/admin/console/register",
        data={"csrf_token": csrf, "name": "Nobody", "forget_examples": "  \n", "mode": "eco"},
    )
    assert empty.status_code == 400 and "forget_examples" in empty.text
    assert 'value="Nobody"' in empty.text  # what was typed stays
    add_pending(registry, "Taken Name")
    taken = client.post(
        "/admin/console/register",
        data={"csrf_token": csrf, "name": "Taken Name", "forget_examples": "Who?", "mode": "eco"},
    )
    assert taken.status_code == 409 and "already exists" in taken.text
    fpr = client.post(
        "/admin/console/register",
        data={"csrf_token": csrf, "name": "X", "forget_examples": "Who?", "fpr": "0.9"},
    )
    assert fpr.status_code == 400 and "options.fpr" in fpr.text


def test_register_form_queues_the_job_and_its_page_shows_the_stages(
    client: TestClient, registry: Registry, csrf: str
) -> None:
    response = client.post(
        "/admin/console/register",
        data={
            "csrf_token": csrf,
            "name": "Queued Person",
            "aliases": "Queued Person\n  \nQP",
            "forget_examples": "Who is Queued Person?\nWhere does QP live? => In Paris.",
            "retain_examples": "Who is someone else?",
            "mode": "eco",
            "fpr": "0.02",
        },
    )
    assert response.status_code == 303
    job_id = response.headers["location"].rsplit("/", 1)[1]
    job = registry.get_job(job_id)
    assert job is not None
    target = registry.get_target(job.target_id)
    assert target is not None
    client.delete(f"/admin/targets/{target.id}", headers=AUTH)  # no training in unit tests
    assert target.aliases == ("Queued Person", "QP")
    assert target.forget_examples == (
        '["Who is Queued Person?", null]',
        '["Where does QP live?", "In Paris."]',
    )
    assert target.options["fpr"] == 0.02


def test_job_page_lists_the_stages_and_polls_until_the_end(
    client: TestClient, registry: Registry
) -> None:
    _, job_id = add_pending(registry, "Job Person")
    page = client.get(f"/admin/console/jobs/{job_id}")
    assert page.status_code == 200
    stages = re.findall(r'data-stage="(\w+)"', page.text)
    assert stages == ["classifier", "answers", "corruption", "activate"]
    assert f'hx-get="/admin/console/jobs/{job_id}/status"' in page.text
    claimed = registry.claim_job("console-test", 600)
    while claimed is not None and claimed.id != job_id:  # older queued rows of other tests
        claimed = registry.claim_job("console-test", 600)
    assert claimed is not None
    registry.fail_job(
        job_id, "RuntimeError: out of luck", owner="console-test", attempt=claimed.attempts
    )
    status = client.get(f"/admin/console/jobs/{job_id}/status")
    assert 'data-status="failed"' in status.text and "out of luck" in status.text
    assert "hx-trigger" not in status.text  # an ended job stops the polling
    listing = client.get("/admin/console/jobs")
    assert job_id in listing.text and "Job Person" in listing.text


def test_playground_without_targets(client: TestClient, csrf: str) -> None:
    page = client.post(
        "/admin/console/playground",
        data={"csrf_token": csrf, "conversation": "Hello there", "action": "answer"},
    )
    assert page.status_code == 200
    assert "Passes: no target flagged" in page.text and "No target is active" in page.text
    assert re.search(r'id="bare-answer">ok<', page.text)
    assert re.search(r'id="guarded-answer">ok<', page.text)
    fragment = client.post(
        "/admin/console/playground",
        data={"conversation": '[{"role": "user"}]'},
        headers={"HX-Request": "true", "X-CSRF-Token": csrf},
    )
    assert fragment.status_code == 400 and "<html" not in fragment.text
    assert "JSON list" in fragment.text


def test_activity_page_and_json(client: TestClient) -> None:
    page = client.get("/admin/console/activity")
    assert page.status_code == 200 and "Passed (no target flagged)" in page.text
    assert "No flagged request yet." in page.text
    data = client.get("/admin/activity", headers=AUTH).json()
    assert data["bucket_seconds"] == 60 and data["series"]
    assert client.get("/admin/audit", headers=AUTH).json() == {"object": "list", "data": []}


def test_jobs_and_playground_json_endpoints(client: TestClient, registry: Registry) -> None:
    target_id, job_id = add_pending(registry, "Listed Person")
    jobs = client.get("/admin/jobs", params={"target_id": target_id}, headers=AUTH).json()
    assert [j["id"] for j in jobs["data"]] == [job_id]
    assert client.get("/admin/jobs", params={"limit": 0}, headers=AUTH).status_code == 400
    everything = client.get("/admin/jobs", headers=AUTH).json()["data"]
    assert job_id in [j["id"] for j in everything]
    times = [j["created_at"] for j in everything]
    assert times == sorted(times, reverse=True)
    answer = client.post(
        "/admin/playground",
        json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
        headers=AUTH,
    ).json()
    assert answer["bare"] == "ok" and answer["guarded"] == "ok"
    assert answer["request_id"].startswith("playground-")
    assert answer["classification"]["flagged"] is False
    both = client.post("/admin/playground", json={"prompt": "a", "messages": []}, headers=AUTH)
    assert both.status_code == 400
    empty = client.post("/admin/playground", json={"messages": []}, headers=AUTH)
    assert empty.status_code == 400 and empty.json()["error"]["param"] == "messages"
    huge = client.post(
        "/admin/playground", json={"prompt": "a", "max_tokens": 10_000}, headers=AUTH
    )
    assert huge.status_code == 400 and huge.json()["error"]["param"] == "max_tokens"


def test_static_files_are_served(client: TestClient) -> None:
    htmx = client.get("/admin/console/static/htmx.min.js")
    assert htmx.status_code == 200 and "htmx" in htmx.text[:200]
    assert client.get("/admin/console/static/nope.js").status_code == 404
