"""The target registry: typed, schema-versioned records in any SQLAlchemy database.

SQLite (a file in the data directory) by default, PostgreSQL by URL (psycopg 3). Every change is
one transaction, so a crash (even kill -9) leaves the old state or the new one. Artifacts
(classifier heads, corruption parameters) are stored in the database with their sha256 and library
versions and checked on load, so every gateway on the same database can load them.

Several gateways share one registry: every change also bumps the `revision` row of
`obliviate_meta` in the same transaction, and `services.registry_sync.RegistryPoller` (one per
gateway) reloads the active targets when the revision it reads differs from the one it last loaded.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    inspect,
    select,
    text,
)
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

SCHEMA_VERSION = 1
# pg_advisory_xact_lock key: gateways starting together create the schema one at a time.
_MIGRATION_LOCK = 0x0B11_71A7E

TargetStatus = str  # "pending" | "training" | "active" | "failed"
JobStatus = str  # "queued" | "running" | "succeeded" | "failed"


class RegistryError(Exception):
    """The registry cannot do what was asked (and says why)."""


class DuplicateTargetError(RegistryError):
    pass


class CorruptArtifactError(RegistryError):
    pass


class _Base(DeclarativeBase):
    pass


def _now() -> datetime:
    return datetime.now(UTC)


class _Meta(_Base):
    __tablename__ = "obliviate_meta"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class _Target(_Base):
    __tablename__ = "obliviate_targets"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    description: Mapped[str] = mapped_column(Text, default="")
    aliases: Mapped[list[str]] = mapped_column(JSON)
    forget_examples: Mapped[list[str]] = mapped_column(JSON)
    retain_examples: Mapped[list[str]] = mapped_column(JSON)
    mode: Mapped[str] = mapped_column(String(32))
    options: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16))
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    threshold_override: Mapped[float | None] = mapped_column(Float, nullable=True)
    version: Mapped[int] = mapped_column(Integer, default=0)
    calibration: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class _Artifact(_Base):
    __tablename__ = "obliviate_artifacts"
    __table_args__ = (UniqueConstraint("target_id", "version", "kind"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    target_id: Mapped[str] = mapped_column(ForeignKey("obliviate_targets.id", ondelete="CASCADE"))
    version: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(32))
    data: Mapped[bytes] = mapped_column(LargeBinary)
    sha256: Mapped[str] = mapped_column(String(64))
    meta: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class _Job(_Base):
    __tablename__ = "obliviate_jobs"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    target_id: Mapped[str] = mapped_column(ForeignKey("obliviate_targets.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16))
    stage: Mapped[str] = mapped_column(String(64), default="")
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


@dataclass(frozen=True)
class TargetRecord:
    id: str
    name: str
    description: str
    aliases: tuple[str, ...]
    forget_examples: tuple[str, ...]
    retain_examples: tuple[str, ...]
    mode: str
    options: Mapping[str, Any]
    status: TargetStatus
    enabled: bool
    threshold_override: float | None
    version: int
    calibration: Mapping[str, Any] | None
    error: str | None
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class JobRecord:
    id: str
    target_id: str
    kind: str
    status: JobStatus
    stage: str
    progress: float
    error: str | None
    result: Mapping[str, Any] | None
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class Artifact:
    kind: str
    data: bytes
    meta: Mapping[str, Any]


def _target(row: _Target) -> TargetRecord:
    return TargetRecord(
        id=row.id,
        name=row.name,
        description=row.description,
        aliases=tuple(row.aliases),
        forget_examples=tuple(row.forget_examples),
        retain_examples=tuple(row.retain_examples),
        mode=row.mode,
        options=dict(row.options),
        status=row.status,
        enabled=row.enabled,
        threshold_override=row.threshold_override,
        version=row.version,
        calibration=row.calibration,
        error=row.error,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def _job(row: _Job) -> JobRecord:
    return JobRecord(
        id=row.id,
        target_id=row.target_id,
        kind=row.kind,
        status=row.status,
        stage=row.stage,
        progress=row.progress,
        error=row.error,
        result=row.result,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def _sqlite_pragmas(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")  # readers never block the writer
        cursor.execute("PRAGMA synchronous=FULL")  # a committed registration survives power loss
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=5000")
        cursor.close()


def database_url(url: str) -> URL:
    """The SQLAlchemy URL to connect with: plain `postgresql://` URLs use psycopg 3."""
    parsed = make_url(url.replace("postgres://", "postgresql://", 1))
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def inspect_registry(url: str, *, connect_timeout_s: float = 5.0) -> int | None:
    """The schema version a registry database records, reading only; None: no registry yet."""
    parsed = database_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite" and parsed.database not in (None, "", ":memory:"):
        if not Path(parsed.database).is_file():
            return None
    connect_args: dict[str, Any] = {}
    if backend == "postgresql":
        connect_args["connect_timeout"] = max(1, round(connect_timeout_s))
    engine = create_engine(parsed, connect_args=connect_args)
    try:
        with engine.connect() as conn:
            if not inspect(conn).has_table(_Meta.__tablename__):
                return None
            value = conn.execute(
                select(_Meta.value).where(_Meta.key == "schema_version")
            ).scalar_one_or_none()
            return int(value) if value is not None else None
    except SQLAlchemyError as e:
        shown = parsed.render_as_string(hide_password=True)
        raise RegistryError(
            f"cannot reach the registry at {shown}: {e.__class__.__name__}: "
            f"{' '.join(str(getattr(e, 'orig', e)).split())[:300]}"
        ) from e
    finally:
        engine.dispose()


class Registry:
    """Targets, their jobs and artifacts; every method is one transaction."""

    def __init__(self, url: str, *, connect_timeout_s: float = 10.0) -> None:
        parsed = database_url(url)
        self.url = parsed.render_as_string(hide_password=True)
        connect_args: dict[str, Any] = {}
        if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        elif parsed.get_backend_name() == "postgresql":
            connect_args["connect_timeout"] = max(1, round(connect_timeout_s))
        self._engine = create_engine(parsed, pool_pre_ping=True, connect_args=connect_args)
        if self._engine.dialect.name == "sqlite":
            _sqlite_pragmas(self._engine)
        self._sessions = sessionmaker(self._engine, expire_on_commit=False)
        self._migrate()

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
            _Base.metadata.create_all(conn)
            # Same transaction, still under the lock: the first gateway writes the meta rows.
            with Session(bind=conn) as s:
                if s.get(_Meta, "revision") is None:
                    s.add(_Meta(key="revision", value="0"))
                row = s.get(_Meta, "schema_version")
                if row is None:
                    s.add(_Meta(key="schema_version", value=str(SCHEMA_VERSION)))
                elif int(row.value) > SCHEMA_VERSION:
                    raise RegistryError(
                        f"the registry at {self.url} has schema {row.value}, newer than this "
                        f"obliviate understands ({SCHEMA_VERSION}); upgrade obliviate"
                    )
                s.flush()

    def schema_version(self) -> int:
        """The schema version the database records."""
        with self._tx() as s:
            row = s.get(_Meta, "schema_version")
            return int(row.value) if row else 0

    def revision(self) -> int:
        """A counter bumped by every change; equal revisions mean the same targets."""
        with self._tx() as s:
            row = s.get(_Meta, "revision")
            return int(row.value) if row else 0

    @staticmethod
    def _bump(s: Session) -> None:
        # Row lock (PostgreSQL): concurrent changes from several gateways never reuse a number.
        row = s.get(_Meta, "revision", with_for_update=True)
        if row is None:
            s.add(_Meta(key="revision", value="1"))
        else:
            row.value = str(int(row.value) + 1)

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
        """A new pending target and its queued registration job, atomically."""
        target = _Target(
            id=uuid.uuid4().hex,
            name=name,
            description=description,
            aliases=list(aliases),
            forget_examples=list(forget_examples),
            retain_examples=list(retain_examples),
            mode=mode,
            options=dict(options),
            status="pending",
            enabled=True,
            version=0,
        )
        job = _Job(id=uuid.uuid4().hex, target_id=target.id, kind="register", status="queued")
        try:
            with self._tx() as s:
                s.add(target)
                s.flush()
                s.add(job)
                self._bump(s)
        except IntegrityError as e:
            raise DuplicateTargetError(f"a target named {name!r} already exists") from e
        return _target(target), _job(job)

    def list_targets(self) -> list[TargetRecord]:
        with self._tx() as s:
            rows = s.scalars(select(_Target).order_by(_Target.created_at)).all()
            return [_target(r) for r in rows]

    def get_target(self, target_id: str) -> TargetRecord | None:
        with self._tx() as s:
            row = s.get(_Target, target_id)
            return _target(row) if row else None

    def update_target(self, target_id: str, **changes: Any) -> TargetRecord | None:
        """Set `enabled` and/or `threshold_override` (None clears it)."""
        allowed = {"enabled", "threshold_override"}
        if set(changes) - allowed:
            raise RegistryError(f"cannot change {sorted(set(changes) - allowed)}")
        with self._tx() as s:
            row = s.get(_Target, target_id)
            if row is None:
                return None
            for key, value in changes.items():
                setattr(row, key, value)
            row.updated_at = _now()
            self._bump(s)
            return _target(row)

    def delete_target(self, target_id: str) -> bool:
        with self._tx() as s:
            row = s.get(_Target, target_id)
            if row is None:
                return False
            for model in (_Artifact, _Job):
                for child in s.scalars(select(model).where(model.target_id == target_id)):
                    s.delete(child)
            s.delete(row)
            self._bump(s)
            return True

    # --- jobs ------------------------------------------------------------------------------

    def get_job(self, job_id: str) -> JobRecord | None:
        with self._tx() as s:
            row = s.get(_Job, job_id)
            return _job(row) if row else None

    def list_jobs(self, *, target_id: str | None = None, limit: int = 100) -> list[JobRecord]:
        """The newest jobs first, all of them or one target's."""
        query = select(_Job).order_by(_Job.created_at.desc()).limit(limit)
        if target_id is not None:
            query = query.where(_Job.target_id == target_id)
        with self._tx() as s:
            return [_job(r) for r in s.scalars(query).all()]

    def unfinished_jobs(self) -> list[JobRecord]:
        """Jobs a previous process queued or ran but never finished (it crashed or stopped)."""
        with self._tx() as s:
            rows = s.scalars(
                select(_Job).where(_Job.status.in_(("queued", "running"))).order_by(_Job.created_at)
            ).all()
            return [_job(r) for r in rows]

    def update_job(self, job_id: str, *, stage: str, progress: float) -> None:
        with self._tx() as s:
            job = s.get(_Job, job_id)
            if job is None:
                return
            job.status, job.stage, job.progress, job.updated_at = "running", stage, progress, _now()
            target = s.get(_Target, job.target_id)
            if target is not None and target.status == "pending":
                target.status = "training"

    def finish_job(
        self,
        job_id: str,
        *,
        artifacts: Sequence[Artifact],
        calibration: Mapping[str, Any],
    ) -> TargetRecord:
        """Store the artifacts as the target's next version and make it active, atomically."""
        with self._tx() as s:
            job = s.get(_Job, job_id)
            if job is None:
                raise RegistryError(f"job {job_id} vanished (its target was deleted)")
            target = s.get(_Target, job.target_id)
            if target is None:
                raise RegistryError(f"target {job.target_id} was deleted")
            version = target.version + 1
            for a in artifacts:
                s.add(
                    _Artifact(
                        target_id=target.id,
                        version=version,
                        kind=a.kind,
                        data=a.data,
                        sha256=hashlib.sha256(a.data).hexdigest(),
                        meta=dict(a.meta),
                    )
                )
            target.version, target.status, target.error = version, "active", None
            target.calibration, target.updated_at = dict(calibration), _now()
            job.status, job.stage, job.progress = "succeeded", "done", 1.0
            job.result, job.updated_at = {"version": version}, _now()
            self._bump(s)
            return _target(target)

    def fail_job(self, job_id: str, error: str) -> None:
        with self._tx() as s:
            job = s.get(_Job, job_id)
            if job is None:
                return
            job.status, job.error, job.updated_at = "failed", error, _now()
            target = s.get(_Target, job.target_id)
            if target is not None and target.status in ("pending", "training"):
                target.status, target.error, target.updated_at = "failed", error, _now()
                self._bump(s)

    # --- artifacts -------------------------------------------------------------------------

    def load_artifacts(self, target_id: str, version: int) -> dict[str, Artifact]:
        """The artifacts of one target version, each checked against its stored sha256."""
        with self._tx() as s:
            rows = s.scalars(
                select(_Artifact).where(
                    _Artifact.target_id == target_id, _Artifact.version == version
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
