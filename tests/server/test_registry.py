"""The registry on SQLite and on a real PostgreSQL: revisions, shared artifacts, polling."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from server.registry import (
    SCHEMA_VERSION,
    Artifact,
    CorruptArtifactError,
    Registry,
    RegistryError,
    database_url,
    inspect_registry,
)
from server.services.registry_sync import RegistryPoller


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'registry.db'}"
    return str(request.getfixturevalue("postgres_url"))


def _new_target(registry: Registry, name: str = "Harry Potter") -> tuple[str, str]:
    target, job = registry.create_target(
        name=name,
        description="",
        aliases=[name],
        forget_examples=["Who is he?"],
        retain_examples=[],
        mode="eco",
        options={},
    )
    return target.id, job.id


def _finish(registry: Registry, job_id: str, artifacts: list[Artifact], **calibration) -> None:
    """Claim the (only) queued job, as a replica would, and finish it."""
    job = registry.claim_job("test-replica", 30)
    assert job is not None and job.id == job_id
    registry.finish_job(
        job_id, artifacts=artifacts, calibration=calibration, owner="test-replica", attempt=1
    )


def test_every_change_bumps_the_revision(url: str):
    registry = Registry(url)
    start = registry.revision()
    target_id, job_id = _new_target(registry)
    assert registry.revision() == start + 1
    registry.list_targets()
    registry.get_target(target_id)
    assert registry.revision() == start + 1  # reads change nothing
    _finish(registry, job_id, [Artifact("classifier", b"x", {})])
    assert registry.revision() == start + 2
    registry.update_target(target_id, enabled=False)
    assert registry.revision() == start + 3
    registry.delete_target(target_id)
    assert registry.revision() == start + 4
    registry.close()


def test_a_second_registry_loads_the_first_ones_artifacts(url: str):
    """Two gateways: artifacts live in the database, not in one node's files."""
    writer, reader = Registry(url), Registry(url)
    target_id, job_id = _new_target(writer)
    _finish(
        writer,
        job_id,
        [
            Artifact("classifier", b"\x00npz-bytes\xff" * 100, {"format": "classifier/npz+json"}),
            Artifact("corruption", b'{"method": "noise"}', {"torch": "x"}),
        ],
        ok=True,
    )
    record = reader.get_target(target_id)
    assert record is not None and record.status == "active" and record.version == 1
    loaded = reader.load_artifacts(target_id, 1)
    assert loaded["classifier"].data == b"\x00npz-bytes\xff" * 100
    assert loaded["corruption"].meta == {"torch": "x"}
    writer.close()
    reader.close()


def test_tampered_artifacts_fail_their_checksum(url: str):
    registry = Registry(url)
    target_id, job_id = _new_target(registry)
    _finish(registry, job_id, [Artifact("classifier", b"good", {})])
    from sqlalchemy import text

    with registry._engine.begin() as conn:
        conn.execute(text("UPDATE obliviate_artifacts SET data = :d"), {"d": b"evil"})
    with pytest.raises(CorruptArtifactError):
        registry.load_artifacts(target_id, 1)
    registry.close()


def test_gateways_starting_together_migrate_once(postgres_url: str):
    """Several replicas start at once on an empty database: none fails creating the schema."""
    errors: list[BaseException] = []
    registries: list[Registry] = []

    def start() -> None:
        try:
            registries.append(Registry(postgres_url))
        except BaseException as e:  # collected and asserted on below
            errors.append(e)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert {r.schema_version() for r in registries} == {SCHEMA_VERSION}
    assert {r.revision() for r in registries} == {0}
    for r in registries:
        r.close()


def test_concurrent_changes_never_reuse_a_revision(postgres_url: str):
    registries = [Registry(postgres_url) for _ in range(3)]
    threads = [
        threading.Thread(target=_new_target, args=(r, f"target {i}"))
        for i, r in enumerate(registries)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert registries[0].revision() == 3
    for r in registries:
        r.close()


def test_plain_postgresql_urls_use_psycopg3():
    assert database_url("postgresql://u:p@db:5432/x").drivername == "postgresql+psycopg"
    assert database_url("postgres://u:p@db/x").drivername == "postgresql+psycopg"
    assert database_url("postgresql+psycopg://u@db/x").drivername == "postgresql+psycopg"
    assert database_url("sqlite:///a.db").drivername == "sqlite"


def test_inspect_registry(url: str, tmp_path: Path):
    assert inspect_registry(f"sqlite:///{tmp_path / 'none.db'}") is None
    assert not (tmp_path / "none.db").exists()  # inspecting creates nothing
    Registry(url).close()
    assert inspect_registry(url) == SCHEMA_VERSION


def test_inspect_an_unreachable_registry_says_so():
    with pytest.raises(RegistryError, match="cannot reach the registry") as err:
        inspect_registry("postgresql://u:secret@127.0.0.1:1/x", connect_timeout_s=1)
    assert "secret" not in str(err.value)


async def test_poller_reloads_when_another_registry_changes(url: str):
    mine, theirs = Registry(url), Registry(url)
    reloads: list[int] = []

    async def reload() -> None:
        reloads.append(len(mine.list_targets()))

    poller = RegistryPoller(mine, reload, interval_s=0.05)
    assert await poller.poll_once() is True  # nothing loaded yet
    assert await poller.poll_once() is False  # same revision: no reload
    poller.start(mine.revision())
    try:
        await asyncio.to_thread(_new_target, theirs)
        for _ in range(100):
            if reloads[-1:] == [1]:
                break
            await asyncio.sleep(0.02)
        assert reloads == [0, 1]
    finally:
        await poller.stop()
        mine.close()
        theirs.close()


async def test_poller_keeps_going_when_the_database_fails(tmp_path: Path):
    registry = Registry(f"sqlite:///{tmp_path / 'r.db'}")
    calls = 0

    def flaky() -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RegistryError("database restarting")
        return 7

    registry.revision = flaky  # type: ignore[method-assign]
    reloaded = asyncio.Event()

    async def reload() -> None:
        reloaded.set()

    poller = RegistryPoller(registry, reload, interval_s=0.01)
    poller.start(0)
    try:
        await asyncio.wait_for(reloaded.wait(), timeout=5)
    finally:
        await poller.stop()
        registry.close()
    assert calls >= 2
