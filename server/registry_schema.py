"""The registry's tables (schema 2) and the typed records read from them.

obliviate_meta             key/value: schema_version, revision
obliviate_targets          one row per target: name, enabled, threshold override, active version
obliviate_target_versions  one row per version: the spec (aliases, examples, mode, options),
                           its status (pending, training, ready, failed), calibration, error
obliviate_artifacts        a version's checksummed artifacts (classifier, corruption, offset)
obliviate_jobs             registration jobs, each with the lease of the replica running it
obliviate_blobs            content-addressed files (δ model folders), stored in chunks
obliviate_blob_chunks
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

SCHEMA_VERSION = 2

VersionStatus = str  # "pending" | "training" | "ready" | "failed"
JobStatus = str  # "queued" | "running" | "succeeded" | "failed"


def now_utc() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class MetaRow(Base):
    __tablename__ = "obliviate_meta"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class TargetRow(Base):
    __tablename__ = "obliviate_targets"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    threshold_override: Mapped[float | None] = mapped_column(Float, nullable=True)
    active_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now_utc)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now_utc)


class VersionRow(Base):
    __tablename__ = "obliviate_target_versions"
    target_id: Mapped[str] = mapped_column(
        ForeignKey("obliviate_targets.id", ondelete="CASCADE"), primary_key=True
    )
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    description: Mapped[str] = mapped_column(Text, default="")
    aliases: Mapped[list[str]] = mapped_column(JSON)
    forget_examples: Mapped[list[str]] = mapped_column(JSON)
    retain_examples: Mapped[list[str]] = mapped_column(JSON)
    mode: Mapped[str] = mapped_column(String(32))
    options: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16))
    calibration: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    job_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now_utc)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now_utc)
    activated_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class ArtifactRow(Base):
    __tablename__ = "obliviate_artifacts"
    __table_args__ = (UniqueConstraint("target_id", "version", "kind"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    target_id: Mapped[str] = mapped_column(ForeignKey("obliviate_targets.id", ondelete="CASCADE"))
    version: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(32))
    data: Mapped[bytes] = mapped_column(LargeBinary)
    sha256: Mapped[str] = mapped_column(String(64))
    meta: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now_utc)


class JobRow(Base):
    __tablename__ = "obliviate_jobs"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    target_id: Mapped[str] = mapped_column(ForeignKey("obliviate_targets.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16))
    stage: Mapped[str] = mapped_column(String(64), default="")
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now_utc)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now_utc)
    # Schema 2: the version the job builds and the lease of the replica running it.
    version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    owner: Mapped[str | None] = mapped_column(String(128), nullable=True)
    lease_expires_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    """Epoch seconds on the database's clock; past it, any replica may take the job over."""
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    """How many times the job was claimed: the fencing token of the current claim."""
    checkpoint: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    """Work a takeover need not redo (a δ model already uploaded)."""


class BlobRow(Base):
    __tablename__ = "obliviate_blobs"
    digest: Mapped[str] = mapped_column(String(64), primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger)
    chunks: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now_utc)
    used_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now_utc)


class BlobChunkRow(Base):
    __tablename__ = "obliviate_blob_chunks"
    digest: Mapped[str] = mapped_column(
        ForeignKey("obliviate_blobs.digest", ondelete="CASCADE"), primary_key=True
    )
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)


@dataclass(frozen=True)
class VersionRecord:
    target_id: str
    version: int
    description: str
    aliases: tuple[str, ...]
    forget_examples: tuple[str, ...]
    retain_examples: tuple[str, ...]
    mode: str
    options: Mapping[str, Any]
    status: VersionStatus
    calibration: Mapping[str, Any] | None
    error: str | None
    job_id: str | None
    created_at: datetime
    updated_at: datetime
    activated_at: datetime | None


@dataclass(frozen=True)
class TargetRecord:
    """A target with its active version (`current`, else its newest), and any pending or newer
    failed version."""

    id: str
    name: str
    enabled: bool
    threshold_override: float | None
    active_version: int | None
    current: VersionRecord
    pending: VersionRecord | None
    failed: VersionRecord | None
    """The newest version, when it failed after the active one (which stays active)."""
    created_at: datetime
    updated_at: datetime

    @property
    def status(self) -> str:
        """`active` while a version is active, else the newest version's status."""
        if self.active_version is not None:
            return "active"
        return "failed" if self.current.status == "failed" else self.current.status

    @property
    def version(self) -> int:
        """The active version (0: none yet)."""
        return self.active_version or 0

    @property
    def error(self) -> str | None:
        if self.failed is not None:
            return f"version {self.failed.version} failed: {self.failed.error}"
        return self.current.error if self.current.status == "failed" else None

    # The spec of the current version, for readers of schema 1's flat record.
    @property
    def description(self) -> str:
        return self.current.description

    @property
    def aliases(self) -> tuple[str, ...]:
        return self.current.aliases

    @property
    def forget_examples(self) -> tuple[str, ...]:
        return self.current.forget_examples

    @property
    def retain_examples(self) -> tuple[str, ...]:
        return self.current.retain_examples

    @property
    def mode(self) -> str:
        return self.current.mode

    @property
    def options(self) -> Mapping[str, Any]:
        return self.current.options

    @property
    def calibration(self) -> Mapping[str, Any] | None:
        return self.current.calibration


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
    version: int | None = None
    owner: str | None = None
    lease_expires_at: float | None = None
    attempts: int = 0
    checkpoint: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class Artifact:
    kind: str
    data: bytes
    meta: Mapping[str, Any]


def version_record(row: VersionRow) -> VersionRecord:
    return VersionRecord(
        target_id=row.target_id,
        version=row.version,
        description=row.description,
        aliases=tuple(row.aliases),
        forget_examples=tuple(row.forget_examples),
        retain_examples=tuple(row.retain_examples),
        mode=row.mode,
        options=dict(row.options),
        status=row.status,
        calibration=row.calibration,
        error=row.error,
        job_id=row.job_id,
        created_at=row.created_at,
        updated_at=row.updated_at,
        activated_at=row.activated_at,
    )


def target_record(row: TargetRow, versions: list[VersionRow]) -> TargetRecord:
    """`versions`: all of the target's versions, any order (at least one)."""
    by_number = {v.version: v for v in versions}
    newest = by_number[max(by_number)]
    active = by_number.get(row.active_version) if row.active_version is not None else None
    pending = newest if newest.status in ("pending", "training") else None
    failed = (
        newest
        if active is not None and newest.status == "failed" and newest.version > active.version
        else None
    )
    current = active or newest
    return TargetRecord(
        id=row.id,
        name=row.name,
        enabled=row.enabled,
        threshold_override=row.threshold_override,
        active_version=row.active_version,
        current=version_record(current),
        pending=version_record(pending) if pending is not None else None,
        failed=version_record(failed) if failed is not None else None,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def job_record(row: JobRow) -> JobRecord:
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
        version=row.version,
        owner=row.owner,
        lease_expires_at=row.lease_expires_at,
        attempts=row.attempts,
        checkpoint=row.checkpoint,
    )
