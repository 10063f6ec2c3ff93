"""Schema 2 of the registry on SQLite and on a real PostgreSQL: the upgrade from schema 1,
versions and rollback, job leases with fencing, and chunked blobs."""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import text

from server.registry import (
    SCHEMA_VERSION,
    Artifact,
    LeaseLostError,
    Registry,
    RegistryError,
    VersionPendingError,
    inspect_registry,
)
from server.registry_blobs import BlobError, bundle_digest
from tests.server.registry_v1 import CLASSIFIER, CORRUPTION, make_v1_registry
from tests.server.test_registry import _new_target


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'registry.db'}"
    return str(request.getfixturevalue("postgres_url"))


SPEC = {
    "description": "",
    "aliases": ["Harry Potter"],
    "forget_examples": ['["Who is he?", null]'],
    "retain_examples": [],
    "mode": "eco",
    "options": {},
}


def _finish(registry: Registry, owner: str = "A", **calibration) -> int:
    job = registry.claim_job(owner, 30)
    assert job is not None
    record = registry.finish_job(
        job.id,
        artifacts=[Artifact("classifier", f"v{job.version}".encode(), {})],
        calibration=calibration,
        owner=owner,
        attempt=job.attempts,
    )
    return record.version


# --- schema 1 -> 2 ---------------------------------------------------------------------------


def test_a_schema_1_registry_upgrades_in_place_without_losing_a_target(url: str):
    ids = make_v1_registry(url)
    assert inspect_registry(url) == 1
    registry = Registry(url)
    try:
        assert registry.schema_version() == SCHEMA_VERSION == inspect_registry(url)
        assert registry.revision() == 8  # bumped: running schema-1 gateways would reload
        targets = {t.name: t for t in registry.list_targets()}
        assert set(targets) == {"Active", "Running", "Failed"}

        active = targets["Active"]
        assert (active.status, active.version, active.active_version) == ("active", 1, 1)
        assert active.threshold_override == 0.8 and active.enabled
        assert active.options == {"fpr": 0.02} and active.aliases == ("x",)
        assert active.calibration == {"classifier": {"threshold": 0.9}}
        loaded = registry.load_artifacts(ids["active"], 1)  # same bytes, checksums still good
        assert loaded["classifier"].data == CLASSIFIER
        assert loaded["corruption"].data == CORRUPTION

        failed = targets["Failed"]
        assert failed.status == "failed" and failed.active_version is None
        assert "boom" in (failed.error or "")

        running = targets["Running"]
        assert running.status == "training" and running.pending is not None
        # The job the dead schema-1 gateway left running is taken over and builds version 1.
        job = registry.claim_job("new-replica", 30)
        assert job is not None and job.id == ids["job"] and job.version == 1
        assert registry.claim_job("another", 30) is None  # the failed/succeeded ones never run
        registry.finish_job(
            job.id, artifacts=[Artifact("classifier", b"c", {})], calibration={},
            owner="new-replica", attempt=job.attempts,
        )  # fmt: skip
        after = registry.get_target(ids["running"])
        assert after is not None and after.status == "active" and after.version == 1
    finally:
        registry.close()
    reopened = Registry(url)  # a second start migrates nothing
    assert len(reopened.list_targets()) == 3
    reopened.close()


# --- versions --------------------------------------------------------------------------------


def test_a_new_version_is_built_while_the_old_one_stays_active(url: str):
    registry = Registry(url)
    target_id, _ = _new_target(registry)
    assert _finish(registry) == 1
    revision = registry.revision()
    job = registry.create_version(target_id, **{**SPEC, "aliases": ["HP"]})
    assert job is not None and job.version == 2 and job.kind == "update"
    assert registry.revision() == revision + 1
    record = registry.get_target(target_id)
    assert record is not None
    assert record.version == 1 and record.status == "active" and record.aliases == ("Harry Potter",)
    assert record.pending is not None and record.pending.version == 2
    with pytest.raises(VersionPendingError):
        registry.create_version(target_id, **SPEC)
    assert _finish(registry) == 2
    record = registry.get_target(target_id)
    assert record is not None and record.version == 2 and record.aliases == ("HP",)
    assert record.pending is None
    assert registry.load_artifacts(target_id, 2)["classifier"].data == b"v2"
    assert registry.load_artifacts(target_id, 1)["classifier"].data == b"v1"  # kept
    registry.close()


def test_a_failed_version_leaves_the_active_one_and_says_why(url: str):
    registry = Registry(url)
    target_id, _ = _new_target(registry)
    _finish(registry)
    registry.create_version(target_id, **SPEC)
    job = registry.claim_job("A", 30)
    assert job is not None
    registry.fail_job(job.id, "RuntimeError: out of memory", owner="A", attempt=job.attempts)
    record = registry.get_target(target_id)
    assert record is not None and record.status == "active" and record.version == 1
    assert record.failed is not None and record.failed.version == 2
    assert record.error == "version 2 failed: RuntimeError: out of memory"
    assert registry.claim_job("B", 30) is None  # failed jobs never re-run
    registry.close()


def test_rollback(url: str):
    registry = Registry(url)
    target_id, _ = _new_target(registry)
    for _ in range(2):
        _finish(registry)
        registry.create_version(target_id, **SPEC)
    _finish(registry)  # v3 active
    assert registry.rollback(target_id).version == 2  # type: ignore[union-attr]
    assert registry.rollback(target_id).version == 1  # type: ignore[union-attr]
    with pytest.raises(RegistryError, match="no earlier ready version"):
        registry.rollback(target_id)
    assert registry.rollback(target_id, 3).version == 3  # type: ignore[union-attr]
    with pytest.raises(RegistryError, match="already active"):
        registry.rollback(target_id, 3)
    with pytest.raises(RegistryError, match="not a ready version"):
        registry.rollback(target_id, 9)
    assert registry.rollback("nope") is None
    registry.close()


def test_only_keep_versions_are_kept(tmp_path: Path):
    registry = Registry(f"sqlite:///{tmp_path / 'r.db'}", keep_versions=2)
    target_id, _ = _new_target(registry)
    _finish(registry)
    for _ in range(3):
        registry.create_version(target_id, **SPEC)
        _finish(registry)
    versions = registry.list_versions(target_id)
    assert [v.version for v in versions or []] == [3, 4]
    assert registry.load_artifacts(target_id, 1) == {}
    registry.close()


# --- leases ----------------------------------------------------------------------------------


def test_a_lease_is_exclusive_until_it_expires_and_fences_the_old_owner(url: str):
    registry = Registry(url)
    _new_target(registry)
    a = registry.claim_job("A", 1.0)
    assert a is not None and a.owner == "A" and a.attempts == 1
    assert registry.claim_job("B", 1.0) is None  # A's lease is live
    assert registry.renew_lease(a.id, "A", 1, 1.0)
    time.sleep(1.3)  # A stops renewing (it died)
    b = registry.claim_job("B", 30)
    assert b is not None and b.id == a.id and b.owner == "B" and b.attempts == 2
    assert not registry.renew_lease(a.id, "A", 1, 30)  # A is fenced off
    with pytest.raises(LeaseLostError):
        registry.update_job(a.id, stage="x", progress=0.5, owner="A", attempt=1)
    with pytest.raises(LeaseLostError):
        registry.finish_job(
            a.id, artifacts=[Artifact("classifier", b"A", {})], calibration={}, owner="A",
            attempt=1,
        )  # fmt: skip
    registry.update_job(b.id, stage="classifier", progress=0.1, owner="B", attempt=2)
    registry.finish_job(
        b.id, artifacts=[Artifact("classifier", b"B", {})], calibration={}, owner="B", attempt=2
    )
    assert registry.claim_job("C", 30) is None  # finished: never claimed again
    done = registry.get_job(a.id)
    assert done is not None and done.status == "succeeded" and done.attempts == 2
    target = registry.get_target(done.target_id)
    assert target is not None and target.version == 1
    assert registry.load_artifacts(done.target_id, 1)["classifier"].data == b"B"
    registry.close()


def test_a_released_job_is_claimed_at_once(url: str):
    registry = Registry(url)
    _new_target(registry)
    job = registry.claim_job("A", 300)
    assert job is not None
    registry.release_job(job.id, "A", 1)
    again = registry.claim_job("B", 300)
    assert again is not None and again.id == job.id and again.attempts == 2
    registry.close()


def test_replicas_claiming_at_once_get_each_job_exactly_once(postgres_url: str):
    registries = [Registry(postgres_url) for _ in range(6)]
    for i in range(4):
        _new_target(registries[0], f"target {i}")
    claimed: list[tuple[int, str]] = []
    lock = threading.Lock()

    def work(i: int) -> None:
        while (job := registries[i].claim_job(f"R{i}", 60)) is not None:
            with lock:
                claimed.append((i, job.id))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ids = [job_id for _, job_id in claimed]
    assert len(ids) == 4 and len(set(ids)) == 4
    for r in registries:
        r.close()


# --- blobs -----------------------------------------------------------------------------------


def _folder(root: Path) -> Path:
    folder = root / "model"
    (folder / "sub").mkdir(parents=True)
    (folder / "config.json").write_text('{"vocab_size": 8}')
    (folder / "sub" / "weights.bin").write_bytes(bytes(range(256)) * 70_000)  # ~18 MB: 3 chunks
    (folder / ".status.json").write_text("{}")  # hidden files stay behind
    return folder


def test_a_folder_stored_by_one_replica_is_rebuilt_by_another(url: str, tmp_path: Path):
    writer, reader = Registry(url), Registry(url)
    folder = _folder(tmp_path / "a")
    manifest = writer.blobs.put_folder(folder)
    assert [f["path"] for f in manifest["files"]] == ["config.json", "sub/weights.bin"]
    assert writer.blobs.put_folder(folder) == manifest  # the same content is stored once
    out = reader.blobs.materialize(manifest, tmp_path / "b" / "cache")
    assert out.name == bundle_digest(manifest)
    for rel in ("config.json", "sub/weights.bin"):
        assert (out / rel).read_bytes() == (folder / rel).read_bytes()
    assert not (out / ".status.json").exists()
    assert reader.blobs.materialize(manifest, tmp_path / "b" / "cache") == out  # cached
    writer.close()
    reader.close()


def test_a_tampered_blob_is_refused_and_never_cached(url: str, tmp_path: Path):
    registry = Registry(url)
    manifest = registry.blobs.put_folder(_folder(tmp_path))
    digest = manifest["files"][1]["sha256"]
    with registry._engine.begin() as conn:
        conn.execute(
            text("UPDATE obliviate_blob_chunks SET data = :d WHERE digest = :g AND seq = 1"),
            {"d": b"evil", "g": digest},
        )
    cache = tmp_path / "cache"
    with pytest.raises(BlobError, match="fails its checksum"):
        registry.blobs.materialize(manifest, cache)
    assert list(cache.iterdir()) == []  # nothing half-written under the bundle's name
    registry.close()


def test_unreferenced_blobs_are_collected_after_their_grace(tmp_path: Path):
    registry = Registry(f"sqlite:///{tmp_path / 'r.db'}", blob_grace_s=0.0)
    target_id, _ = _new_target(registry)
    data = b"weights" * 1000
    (tmp_path / "w.bin").write_bytes(data)
    digest, _ = registry.blobs.put_file(tmp_path / "w.bin")
    assert digest == hashlib.sha256(data).hexdigest()
    job = registry.claim_job("A", 30)
    assert job is not None
    registry.finish_job(
        job.id, artifacts=[Artifact("offset", b"{}", {"blobs": [digest]})], calibration={},
        owner="A", attempt=1,
    )  # fmt: skip
    other, _ = _new_target(registry, "other")
    registry.delete_target(other)
    assert registry.blobs.has(digest)  # still referenced by the first target
    registry.delete_target(target_id)
    assert not registry.blobs.has(digest)
    registry.close()


def test_doctor_reports_failed_targets(tmp_path: Path):
    from server.doctor import check_registry_targets
    from server.settings import Settings

    url = f"sqlite:///{tmp_path / 'r.db'}"
    registry = Registry(url)
    ok_id, _ = _new_target(registry, "Fine")
    _finish(registry)
    broken_id, _ = _new_target(registry, "Broken")
    _finish(registry)
    _new_target(registry, "Never")
    job = registry.claim_job("A", 30)
    assert job is not None
    registry.fail_job(job.id, "ValueError: no examples", owner="A", attempt=1)
    registry.create_version(ok_id, **SPEC)
    job = registry.claim_job("A", 30)
    assert job is not None
    registry.fail_job(job.id, "RuntimeError: engine down", owner="A", attempt=1)
    with registry._engine.begin() as conn:
        conn.execute(
            text("UPDATE obliviate_artifacts SET data = :d WHERE target_id = :t"),
            {"d": b"rot", "t": broken_id},
        )
    registry.close()

    settings = Settings(data_dir=tmp_path, admin_token="x" * 20, registry_url=url)
    findings = {f.check.split(" (")[0]: f for f in check_registry_targets(settings)}
    assert findings["target Fine"].level == "warn"
    assert "version 2 failed: RuntimeError: engine down" in findings["target Fine"].message
    assert findings["target Broken"].level == "fail"
    assert "fails its checksum" in findings["target Broken"].message
    assert findings["target Never"].level == "fail"
    assert "no examples" in findings["target Never"].message
