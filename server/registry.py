"""The target registry: typed, schema-versioned records in any SQLAlchemy database.

SQLite (a file in the data directory) by default, PostgreSQL by URL (psycopg 3). Every change is
one transaction, so a crash (even kill -9) leaves the old state or the new one. Artifacts
(classifier heads, corruption parameters, δ model folders as blobs) are stored in the database
with their sha256 and checked on load, so every gateway on the same database can load them.

Several gateways share one registry:
- every change bumps the `revision` row of `obliviate_meta` in the same transaction, and
  `services.registry_sync.RegistryPoller` (one per gateway) reloads when the revision moved;
- targets are versioned (`registry_schema`): a new version is built while the active one stays
  enforced, and activation is one transaction that moves `active_version`;
- a job is run by the replica holding its lease (`claim_job`, `renew_lease`): an expired lease
  is taken over by any replica, and every write of a job is fenced by (owner, attempt), so a
  replica that lost its lease cannot finish, fail or report on the job any more.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import and_, create_engine, delete, event, inspect, or_, select, text, update
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from server.registry_blobs import GC_GRACE_S, BlobStore, collect_garbage, touch
from server.registry_migrate import upgrade
from server.registry_schema import (
    SCHEMA_VERSION,
    Artifact,
    ArtifactRow,
    Base,
    BlobRow,
    JobRecord,
    JobRow,
    MetaRow,
    TargetRecord,
    TargetRow,
    VersionRecord,
    VersionRow,
    job_record,
    now_utc,
    target_record,
    version_record,
)

# pg_advisory_xact_lock key: gateways starting together create the schema one at a time.
_MIGRATION_LOCK = 0x0B11_71A7E
DEFAULT_KEEP_VERSIONS = 10

__all__ = [
    "SCHEMA_VERSION",
    "Artifact",
    "CorruptArtifactError",
    "DuplicateTargetError",
    "JobRecord",
    "LeaseLostError",
    "Registry",
    "RegistryError",
    "TargetRecord",
    "VersionPendingError",
    "VersionRecord",
    "database_url",
    "inspect_registry",
]


class RegistryError(Exception):
    """The registry cannot do what was asked (and says why)."""


class DuplicateTargetError(RegistryError):
    pass


class CorruptArtifactError(RegistryError):
    pass


class VersionPendingError(RegistryError):
    """A new version is asked for while another one is still being built."""


class LeaseLostError(RegistryError):
    """This replica no longer holds the job's lease (taken over, or the target was deleted)."""


def _sqlite_pragmas(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")  # readers never block the writer
        cursor.execute("PRAGMA synchronous=FULL")  # a committed registration survives power loss
        cursor.execute("PRAGMA foreign_keys=ON")
        # A δ model upload holds the write lock for seconds; other writers wait for it.
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()


def database_url(url: str) -> URL:
    """The SQLAlchemy URL to connect with: plain `postgresql://` URLs use psycopg 3."""
    parsed = make_url(url.replace("postgres://", "postgresql://", 1))
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def _connect_args(parsed: URL, timeout_s: float) -> dict[str, Any]:
    if parsed.get_backend_name() == "postgresql":
        return {"connect_timeout": max(1, round(timeout_s))}
    return {}


def inspect_registry(url: str, *, connect_timeout_s: float = 5.0) -> int | None:
    """The schema version a registry database records, reading only; None: no registry yet."""
    parsed = database_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        if not Path(parsed.database).is_file():
            return None
    engine = create_engine(parsed, connect_args=_connect_args(parsed, connect_timeout_s))
    try:
        with engine.connect() as conn:
            return _schema_version(conn)
    except SQLAlchemyError as e:
        raise RegistryError(_unreachable(parsed, e)) from e
    finally:
        engine.dispose()


def _schema_version(conn: Any) -> int | None:
    if not inspect(conn).has_table(MetaRow.__tablename__):
        return None
    value = conn.execute(
        select(MetaRow.value).where(MetaRow.key == "schema_version")
    ).scalar_one_or_none()
    return int(value) if value is not None else None


def _unreachable(parsed: URL, e: SQLAlchemyError) -> str:
    shown = parsed.render_as_string(hide_password=True)
    reason = " ".join(str(getattr(e, "orig", e)).split())[:300]
    return f"cannot reach the registry at {shown}: {e.__class__.__name__}: {reason}"


class Registry:
    """Targets, their versions, jobs and artifacts; every method is one transaction."""

    def __init__(
        self,
        url: str,
        *,
        connect_timeout_s: float = 10.0,
        keep_versions: int = DEFAULT_KEEP_VERSIONS,
        blob_grace_s: float = GC_GRACE_S,
    ) -> None:
        parsed = database_url(url)
        self.url = parsed.render_as_string(hide_password=True)
        self.keep_versions = keep_versions
        self.blob_grace_s = blob_grace_s
        if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        self._engine = create_engine(
            parsed, pool_pre_ping=True, connect_args=_connect_args(parsed, connect_timeout_s)
        )
        if self._engine.dialect.name == "sqlite":
            _sqlite_pragmas(self._engine)
        self._sessions = sessionmaker(self._engine, expire_on_commit=False)
        self._migrate()
        self.blobs = BlobStore(self._tx)

    def close(self) -> None:
        self._engine.dispose()

    @contextmanager
    def _tx(self) -> Iterator[Session]:
        with self._sessions.begin() as session:
            yield session

    def _migrate(self) -> None:
        with self._engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})
            found = _schema_version(conn)
            if found is not None and found > SCHEMA_VERSION:
                raise RegistryError(
                    f"the registry at {self.url} has schema {found}, newer than this "
                    f"obliviate understands ({SCHEMA_VERSION}); upgrade obliviate"
                )
            if found is not None and found < SCHEMA_VERSION:
                upgrade(conn, found)  # same transaction, still under the lock
            Base.metadata.create_all(conn)
            with Session(bind=conn) as s:
                if s.get(MetaRow, "revision") is None:
                    s.add(MetaRow(key="revision", value="0"))
                row = s.get(MetaRow, "schema_version")
                if row is None:
                    s.add(MetaRow(key="schema_version", value=str(SCHEMA_VERSION)))
                else:
                    row.value = str(SCHEMA_VERSION)
                if found is not None and found < SCHEMA_VERSION:
                    self._bump(s)  # gateways still running reload what they read
                s.flush()

    def schema_version(self) -> int:
        """The schema version the database records."""
        with self._tx() as s:
            row = s.get(MetaRow, "schema_version")
            return int(row.value) if row else 0

    def revision(self) -> int:
        """A counter bumped by every change; equal revisions mean the same targets."""
        with self._tx() as s:
            row = s.get(MetaRow, "revision")
            return int(row.value) if row else 0

    @staticmethod
    def _bump(s: Session) -> None:
        # Row lock (PostgreSQL): concurrent changes from several gateways never reuse a number.
        row = s.get(MetaRow, "revision", with_for_update=True)
        if row is None:
            s.add(MetaRow(key="revision", value="1"))
        else:
            row.value = str(int(row.value) + 1)

    def now(self) -> float:
        """Epoch seconds on the database's clock (PostgreSQL), so replicas' clocks do not matter."""
        with self._tx() as s:
            return self._db_now(s)

    @staticmethod
    def _db_now(s: Session) -> float:
        if s.get_bind().dialect.name == "postgresql":
            return float(s.scalar(text("SELECT EXTRACT(EPOCH FROM clock_timestamp())")) or 0)
        return time.time()  # SQLite: one file, one machine, one clock

    # --- targets ---------------------------------------------------------------------------

    def create_target(
        self,
        *,
        name: str,
        description: str,
        aliases: Sequence[str],
        forget_examples: Sequence[str],
        retain_examples: Sequence[str],
        mode: str,
        options: Mapping[str, Any],
    ) -> tuple[TargetRecord, JobRecord]:
        """A new target, its pending version 1 and the job that builds it, atomically."""
        target = TargetRow(id=uuid.uuid4().hex, name=name, enabled=True)
        try:
            with self._tx() as s:
                s.add(target)
                s.flush()
                version, job = self._add_version(
                    s, target.id, 1, description, aliases, forget_examples, retain_examples,
                    mode, options, kind="register",
                )  # fmt: skip
                self._bump(s)
                return target_record(target, [version]), job_record(job)
        except IntegrityError as e:
            raise DuplicateTargetError(f"a target named {name!r} already exists") from e

    def create_version(
        self,
        target_id: str,
        *,
        description: str,
        aliases: Sequence[str],
        forget_examples: Sequence[str],
        retain_examples: Sequence[str],
        mode: str,
        options: Mapping[str, Any],
    ) -> JobRecord | None:
        """Queue the next version of a target (the active one stays); None: no such target."""
        with self._tx() as s:
            target = s.get(TargetRow, target_id, with_for_update=True)
            if target is None:
                return None
            versions = self._versions(s, target_id)
            newest = versions[-1]
            if newest.status in ("pending", "training"):
                raise VersionPendingError(
                    f"version {newest.version} of this target is still being built (job "
                    f"{newest.job_id}); wait for it to finish, then send the new version"
                )
            _, job = self._add_version(
                s, target_id, newest.version + 1, description, aliases, forget_examples,
                retain_examples, mode, options, kind="update",
            )  # fmt: skip
            target.updated_at = now_utc()
            self._bump(s)
            return job_record(job)

    @staticmethod
    def _add_version(
        s: Session,
        target_id: str,
        number: int,
        description: str,
        aliases: Sequence[str],
        forget_examples: Sequence[str],
        retain_examples: Sequence[str],
        mode: str,
        options: Mapping[str, Any],
        *,
        kind: str,
    ) -> tuple[VersionRow, JobRow]:
        job = JobRow(
            id=uuid.uuid4().hex,
            target_id=target_id,
            kind=kind,
            status="queued",
            version=number,
            attempts=0,
            stage="",
            progress=0.0,
        )
        version = VersionRow(
            target_id=target_id,
            version=number,
            description=description,
            aliases=list(aliases),
            forget_examples=list(forget_examples),
            retain_examples=list(retain_examples),
            mode=mode,
            options=dict(options),
            status="pending",
            job_id=job.id,
        )
        s.add(version)
        s.add(job)
        s.flush()
        return version, job

    @staticmethod
    def _versions(s: Session, target_id: str) -> list[VersionRow]:
        return list(
            s.scalars(
                select(VersionRow)
                .where(VersionRow.target_id == target_id)
                .order_by(VersionRow.version)
            )
        )

    def list_targets(self) -> list[TargetRecord]:
        with self._tx() as s:
            rows = s.scalars(select(TargetRow).order_by(TargetRow.created_at)).all()
            by_target: dict[str, list[VersionRow]] = {}
            for v in s.scalars(select(VersionRow)):
                by_target.setdefault(v.target_id, []).append(v)
            return [target_record(r, by_target[r.id]) for r in rows if r.id in by_target]

    def get_target(self, target_id: str) -> TargetRecord | None:
        with self._tx() as s:
            row = s.get(TargetRow, target_id)
            versions = self._versions(s, target_id) if row is not None else []
            return target_record(row, versions) if row is not None and versions else None

    def list_versions(self, target_id: str) -> list[VersionRecord] | None:
        """Every kept version of a target, oldest first; None: no such target."""
        with self._tx() as s:
            if s.get(TargetRow, target_id) is None:
                return None
            return [version_record(v) for v in self._versions(s, target_id)]

    def update_target(self, target_id: str, **changes: Any) -> TargetRecord | None:
        """Set `enabled` and/or `threshold_override` (None clears it)."""
        allowed = {"enabled", "threshold_override"}
        if set(changes) - allowed:
            raise RegistryError(f"cannot change {sorted(set(changes) - allowed)}")
        with self._tx() as s:
            row = s.get(TargetRow, target_id, with_for_update=True)
            if row is None:
                return None
            for key, value in changes.items():
                setattr(row, key, value)
            row.updated_at = now_utc()
            self._bump(s)
            return target_record(row, self._versions(s, target_id))

    def rollback(self, target_id: str, version: int | None = None) -> TargetRecord | None:
        """Activate an earlier ready version (default: the newest ready one before the active)."""
        with self._tx() as s:
            row = s.get(TargetRow, target_id, with_for_update=True)
            if row is None:
                return None
            versions = self._versions(s, target_id)
            ready = [v for v in versions if v.status == "ready" and v.version != row.active_version]
            if version is None:
                older = [v for v in ready if v.version < (row.active_version or 0)]
                if not older:
                    raise RegistryError(
                        f"no earlier ready version to roll back to (active: v{row.active_version}"
                        f"; kept: {', '.join(f'v{v.version} {v.status}' for v in versions)})"
                    )
                chosen = older[-1]
            else:
                found = [v for v in ready if v.version == version]
                if not found:
                    raise RegistryError(
                        f"version {version} cannot be activated: it is "
                        + (
                            "already active"
                            if version == row.active_version
                            else "not a ready version of this target"
                        )
                    )
                chosen = found[0]
            row.active_version, row.updated_at = chosen.version, now_utc()
            chosen.activated_at = now_utc()
            self._bump(s)
            return target_record(row, versions)

    def delete_target(self, target_id: str) -> bool:
        with self._tx() as s:
            row = s.get(TargetRow, target_id, with_for_update=True)
            if row is None:
                return False
            # In order, as statements: the ORM would not order deletes of unrelated mappings.
            s.execute(delete(ArtifactRow).where(ArtifactRow.target_id == target_id))
            s.execute(delete(JobRow).where(JobRow.target_id == target_id))
            s.execute(delete(VersionRow).where(VersionRow.target_id == target_id))
            s.execute(delete(TargetRow).where(TargetRow.id == target_id))
            collect_garbage(s, self.blob_grace_s)
            self._bump(s)
            return True

    # --- jobs ------------------------------------------------------------------------------

    def get_job(self, job_id: str) -> JobRecord | None:
        with self._tx() as s:
            row = s.get(JobRow, job_id)
            return job_record(row) if row else None

    def list_jobs(self, *, target_id: str | None = None, limit: int = 100) -> list[JobRecord]:
        """The newest jobs first, all of them or one target's."""
        query = select(JobRow).order_by(JobRow.created_at.desc()).limit(limit)
        if target_id is not None:
            query = query.where(JobRow.target_id == target_id)
        with self._tx() as s:
            return [job_record(r) for r in s.scalars(query).all()]

    def unfinished_jobs(self) -> list[JobRecord]:
        """Jobs queued or running (under a lease, or left by a replica that died)."""
        with self._tx() as s:
            rows = s.scalars(
                select(JobRow)
                .where(JobRow.status.in_(("queued", "running")))
                .order_by(JobRow.created_at)
            ).all()
            return [job_record(r) for r in rows]

    def claim_job(self, owner: str, lease_s: float) -> JobRecord | None:
        """Take the oldest job that is queued or whose lease expired; None when there is none.

        The claim is a compare-and-set on the job row, so of several replicas asking at once
        exactly one gets each job. A job that finished (succeeded or failed) is never claimed.
        """
        with self._tx() as s:
            now = self._db_now(s)
            claimable = or_(
                JobRow.status == "queued",
                and_(
                    JobRow.status == "running",
                    or_(JobRow.lease_expires_at.is_(None), JobRow.lease_expires_at < now),
                ),
            )
            candidates = list(
                s.scalars(select(JobRow.id).where(claimable).order_by(JobRow.created_at).limit(8))
            )
            for job_id in candidates:
                result = s.execute(
                    update(JobRow)
                    .where(JobRow.id == job_id, claimable)
                    .values(
                        status="running",
                        owner=owner,
                        lease_expires_at=now + lease_s,
                        attempts=JobRow.attempts + 1,
                        updated_at=now_utc(),
                    )
                    .execution_options(synchronize_session=False)
                )
                if getattr(result, "rowcount", 0) == 1:
                    row = s.get(JobRow, job_id, populate_existing=True)
                    assert row is not None
                    version = self._version_of(s, row)
                    if version is not None and version.status == "pending":
                        version.status, version.updated_at = "training", now_utc()
                    return job_record(row)
            return None

    def _fenced(self, s: Session, job_id: str, owner: str, attempt: int) -> JobRow:
        row = s.get(JobRow, job_id, with_for_update=True)
        if row is None:
            raise LeaseLostError(f"job {job_id} vanished (its target was deleted)")
        if row.owner != owner or row.attempts != attempt or row.status != "running":
            raise LeaseLostError(
                f"job {job_id} is no longer this replica's (owner {row.owner}, attempt "
                f"{row.attempts}, status {row.status})"
            )
        return row

    def renew_lease(self, job_id: str, owner: str, attempt: int, lease_s: float) -> bool:
        """Extend this replica's lease; False when it is not ours any more."""
        with self._tx() as s:
            try:
                row = self._fenced(s, job_id, owner, attempt)
            except LeaseLostError:
                return False
            row.lease_expires_at = self._db_now(s) + lease_s
            return True

    def release_job(self, job_id: str, owner: str, attempt: int) -> None:
        """Give the job back (a replica shutting down): another one may claim it at once."""
        with self._tx() as s:
            try:
                row = self._fenced(s, job_id, owner, attempt)
            except LeaseLostError:
                return
            row.status, row.lease_expires_at, row.updated_at = "queued", None, now_utc()

    def update_job(
        self, job_id: str, *, stage: str, progress: float, owner: str, attempt: int
    ) -> None:
        """Record progress (LeaseLostError when the job is not this replica's any more)."""
        with self._tx() as s:
            row = self._fenced(s, job_id, owner, attempt)
            row.stage, row.progress, row.updated_at = stage, progress, now_utc()

    def save_checkpoint(
        self, job_id: str, data: Mapping[str, Any], *, owner: str, attempt: int
    ) -> None:
        """Keep work a takeover need not redo."""
        with self._tx() as s:
            row = self._fenced(s, job_id, owner, attempt)
            row.checkpoint = {**(row.checkpoint or {}), **data}

    def get_version(self, target_id: str, version: int) -> VersionRecord | None:
        with self._tx() as s:
            row = s.get(VersionRow, (target_id, version))
            return version_record(row) if row else None

    @staticmethod
    def _version_of(s: Session, job: JobRow) -> VersionRow | None:
        if job.version is None:
            return None
        return s.get(VersionRow, (job.target_id, job.version))

    def finish_job(
        self,
        job_id: str,
        *,
        artifacts: Sequence[Artifact],
        calibration: Mapping[str, Any],
        owner: str,
        attempt: int,
    ) -> TargetRecord:
        """Store the version's artifacts and make it the active one, atomically."""
        with self._tx() as s:
            job = self._fenced(s, job_id, owner, attempt)
            target = s.get(TargetRow, job.target_id, with_for_update=True)
            version = self._version_of(s, job)
            if target is None or version is None:
                raise LeaseLostError(f"the target of job {job_id} was deleted")
            blobs = [str(d) for a in artifacts for d in a.meta.get("blobs", [])]
            missing = touch(s, blobs)
            if missing:
                raise RegistryError(f"blobs {', '.join(d[:12] for d in missing)} are missing")
            for a in artifacts:
                s.add(
                    ArtifactRow(
                        target_id=target.id,
                        version=version.version,
                        kind=a.kind,
                        data=a.data,
                        sha256=hashlib.sha256(a.data).hexdigest(),
                        meta=dict(a.meta),
                    )
                )
            version.status, version.error, version.updated_at = "ready", None, now_utc()
            version.calibration, version.activated_at = dict(calibration), now_utc()
            target.active_version, target.updated_at = version.version, now_utc()
            job.status, job.stage, job.progress = "succeeded", "done", 1.0
            job.result, job.updated_at = {"version": version.version}, now_utc()
            job.lease_expires_at = None
            s.flush()
            self._prune(s, target)
            self._bump(s)
            return target_record(target, self._versions(s, target.id))

    def _prune(self, s: Session, target: TargetRow) -> None:
        """Drop the oldest versions beyond `keep_versions` (never the active one)."""
        versions = self._versions(s, target.id)
        extra = len(versions) - self.keep_versions
        for v in versions:
            if extra <= 0:
                break
            if v.version == target.active_version or v.status in ("pending", "training"):
                continue
            for a in s.scalars(
                select(ArtifactRow).where(
                    ArtifactRow.target_id == target.id, ArtifactRow.version == v.version
                )
            ):
                s.delete(a)
            for j in s.scalars(
                select(JobRow).where(JobRow.target_id == target.id, JobRow.version == v.version)
            ):
                s.delete(j)
            s.delete(v)
            extra -= 1
        s.flush()
        collect_garbage(s, self.blob_grace_s)

    def fail_job(self, job_id: str, error: str, *, owner: str, attempt: int) -> None:
        """Record why the job failed; the target's active version (if any) stays active."""
        with self._tx() as s:
            job = self._fenced(s, job_id, owner, attempt)
            job.status, job.error, job.updated_at = "failed", error, now_utc()
            job.lease_expires_at = None
            version = self._version_of(s, job)
            if version is not None:
                version.status, version.error, version.updated_at = "failed", error, now_utc()
            self._bump(s)

    # --- artifacts -------------------------------------------------------------------------

    def load_artifacts(self, target_id: str, version: int) -> dict[str, Artifact]:
        """The artifacts of one target version, each checked against its stored sha256."""
        with self._tx() as s:
            rows = s.scalars(
                select(ArtifactRow).where(
                    ArtifactRow.target_id == target_id, ArtifactRow.version == version
                )
            ).all()
            found: dict[str, Artifact] = {}
            for row in rows:
                if hashlib.sha256(row.data).hexdigest() != row.sha256:
                    raise CorruptArtifactError(
                        f"artifact {row.kind} of target {target_id} v{version} fails its checksum"
                    )
                found[row.kind] = Artifact(row.kind, row.data, dict(row.meta))
            return found


def check_targets(url: str, *, connect_timeout_s: float = 5.0) -> list[tuple[str, str, str]]:
    """Read-only health of every target: (level, target, message) with level ok, warn or fail.

    `fail`: the target is not enforced (no active version and its registration failed, or its
    active version's artifacts fail their checksum or miss their blobs); `warn`: a newer
    version failed and the previous one stays active. Nothing is created or migrated.
    """
    parsed = database_url(url)
    engine = create_engine(parsed, connect_args=_connect_args(parsed, connect_timeout_s))
    found: list[tuple[str, str, str]] = []
    try:
        with Session(engine) as s:
            rows = s.scalars(select(TargetRow).order_by(TargetRow.created_at)).all()
            for row in rows:
                versions = list(s.scalars(select(VersionRow).where(VersionRow.target_id == row.id)))
                if not versions:
                    continue
                record = target_record(row, versions)
                label = f"{record.name} ({record.id})"
                if record.active_version is None:
                    level = "fail" if record.status == "failed" else "ok"
                    found.append((level, label, f"{record.status}: {record.error or 'no error'}"))
                    continue
                problem = _artifact_problem(s, row.id, record.active_version)
                if problem is not None:
                    found.append(("fail", label, f"v{record.active_version} {problem}"))
                elif record.failed is not None:
                    found.append(("warn", label, f"v{record.version} active; {record.error}"))
                else:
                    state = "enabled" if record.enabled else "disabled"
                    found.append(("ok", label, f"v{record.version} active, {state}"))
    except SQLAlchemyError as e:
        raise RegistryError(_unreachable(parsed, e)) from e
    finally:
        engine.dispose()
    return found


def _artifact_problem(s: Session, target_id: str, version: int) -> str | None:
    artifacts = s.scalars(
        select(ArtifactRow).where(
            ArtifactRow.target_id == target_id, ArtifactRow.version == version
        )
    ).all()
    if not any(a.kind == "classifier" for a in artifacts):
        return "has no classifier artifact"
    for a in artifacts:
        if hashlib.sha256(a.data).hexdigest() != a.sha256:
            return f"artifact {a.kind} fails its checksum"
        for digest in (a.meta or {}).get("blobs", []):
            if s.get(BlobRow, digest) is None:
                return f"artifact {a.kind} refers to a missing blob {str(digest)[:12]}"
    return None
