"""Tenants: keys carry their tenant, targets are scoped to keys or tenants, and the guard, the
audit log and the metrics know who asked. (End to end: tests/e2e/test_dropin_guarded.py.)"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from classifier import Decision
from server.auth import ApiKeys
from server.engine import ChatPrompt
from server.metrics import Metrics
from server.services.guard import ActiveTarget, EcoGuard
from server.services.tenancy import Caller, TenantScope, key_digest


def test_keys_file_gives_each_key_its_tenant(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text("# key tenant\nsk-a team-a\nsk-b\tteam-b\n\nsk-c\n")
    keys = ApiKeys.load(["sk-inline team-x"], path)
    assert keys.caller("sk-a") == Caller(key_digest("sk-a"), "team-a")
    assert keys.caller("sk-b") == Caller(key_digest("sk-b"), "team-b")
    assert keys.caller("sk-c") == Caller(key_digest("sk-c"), None)
    assert keys.caller("sk-inline") == Caller(key_digest("sk-inline"), "team-x")
    assert keys.caller("sk-a team-a") is None and keys.caller(None) is None
    assert keys.identify("sk-b") == "key:2"  # the rate limiter's label is unchanged
    assert keys.tenant_of("sk-a") == "team-a" and keys.tenant_of("nope") is None
    assert ApiKeys([]).caller(None) == Caller()  # open /v1: an anonymous caller


@pytest.mark.parametrize(
    ("scope", "caller", "applies"),
    [
        (TenantScope(), None, True),
        (TenantScope(), Caller("d", "t"), True),
        (TenantScope.from_request(tenants=["team-a"]), Caller("d", "team-a"), True),
        (TenantScope.from_request(tenants=["team-a"]), Caller("d", "team-b"), False),
        (TenantScope.from_request(tenants=["team-a"]), None, False),
        (TenantScope.from_request(tenants=["team-a"]), Caller(), False),
        (TenantScope.from_request(api_keys=["sk-a"]), Caller(key_digest("sk-a")), True),
        (TenantScope.from_request(api_keys=["sk-a"]), Caller(key_digest("sk-b"), "x"), False),
        (
            TenantScope.from_request(["sk-a"], ["team-b"]),
            Caller(key_digest("sk-z"), "team-b"),
            True,
        ),
    ],
)
def test_scope_applies_to(scope: TenantScope, caller: Caller | None, applies: bool) -> None:
    assert scope.applies_to(caller) is applies


def test_scope_round_trips_through_target_options_without_keys() -> None:
    scope = TenantScope.from_request(["sk-secret"], ["team-a"])
    option = scope.to_option()
    assert "sk-secret" not in str(option)  # only the digest is stored
    assert TenantScope.from_options({"tenant_scope": option}) == scope
    assert TenantScope.from_options({}).everyone


@dataclass
class StubBank:
    """Flags every text for every target it holds (the guard's filtering is what is tested)."""

    names: list[str] = field(default_factory=list)

    def set_targets(self, targets: Iterable[Any]) -> None:
        self.names = [t.name for t in targets]

    def classify(self, texts: Sequence[str]) -> list[list[Decision]]:
        return [[Decision(n, 0.99, 0.5, True, "full") for n in self.names] for _ in texts]

    def classify_all(self, texts: Sequence[str]) -> list[Decision]:
        return [Decision(n, 0.99, 0.5, True, "full") for n in self.names]

    def classify_groups(
        self, groups: Sequence[Sequence[str]], *, only_flagged: bool = False
    ) -> list[list[Decision]]:
        return [self.classify_all(group) for group in groups]

    def settled_groups(self, groups: Sequence[Sequence[str]]) -> list[list[Decision] | None]:
        return [None for _ in groups]  # flagged at the full stage: never settled by the static

    def find_spans(self, text: str, names: Iterable[str]) -> dict[str, list[tuple[int, int]]]:
        return {n: [] for n in names}


@dataclass(frozen=True)
class StubClassifier:
    name: str


def target(name: str, scope: TenantScope) -> ActiveTarget:
    return ActiveTarget(
        id=f"id-{name}",
        name=name,
        aliases=(),
        corruption=None,  # δ-style: flagged requests are audited without a corruptor
        classifier=StubClassifier(name),  # type: ignore[arg-type]
        tenants=scope,
    )


@pytest.fixture
def guard() -> tuple[EcoGuard, Metrics]:
    metrics = Metrics()
    eco = EcoGuard(StubBank(), None, metrics)  # type: ignore[arg-type]
    eco.set_targets(
        [
            target("global", TenantScope()),
            target("team-a only", TenantScope.from_request(tenants=["team-a"])),
        ]
    )
    return eco, metrics


def test_guard_applies_only_the_targets_in_the_callers_scope(guard, caplog) -> None:
    eco, metrics = guard
    assert set(eco.in_scope(Caller("d", "team-a"))) == {"global", "team-a only"}
    assert set(eco.in_scope(Caller("d", "team-b"))) == {"global"}
    assert set(eco.in_scope(None)) == {"global"}
    caplog.set_level(logging.INFO, logger="obliviate.audit")
    prompt = ChatPrompt([{"role": "user", "content": "hi"}])
    asyncio.run(eco.protect(prompt, "r1", Caller("d", "team-a", end_user="ann")))
    asyncio.run(eco.protect(prompt, "r2", Caller("d", "team-b")))
    lines = [r.getMessage() for r in caplog.records if r.name == "obliviate.audit"]
    assert any("request_id=r1 tenant=team-a user='ann'" in line for line in lines), lines
    assert any("request_id=r2 tenant=team-b user=None" in line for line in lines), lines
    exported = metrics.render().decode()
    assert (
        'obliviate_guard_decisions_total{action="delta",target="id-global",tenant="team-a"}'
        in exported
    )
    assert 'target="id-team-a only",tenant="team-b"' not in exported


def test_registration_stores_the_scope_hashed(client) -> None:
    from tests.conftest import ADMIN_TOKEN

    body = {
        "name": "Scoped",
        "forget_examples": ["Who is Scoped?"],
        "scope": {"api_keys": ["sk-secret"], "tenants": ["team-a"]},
    }
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    job = client.post("/admin/targets", json=body, headers=auth)
    assert job.status_code == 202, job.text
    record = client.get(f"/admin/targets/{job.json()['target_id']}", headers=auth).json()
    assert record["options"]["tenant_scope"] == {
        "api_keys": [key_digest("sk-secret")],
        "tenants": ["team-a"],
    }
    bad = client.post("/admin/targets", json={**body, "scope": {"groups": ["x"]}}, headers=auth)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "scope.groups"
