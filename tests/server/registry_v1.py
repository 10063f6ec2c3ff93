"""Schema 1 of the registry, frozen as it shipped, to test the in-place upgrade to schema 2.

`make_v1_registry(url)` creates the schema-1 tables and fills them the way a schema-1 gateway
would have: an active target with its artifacts, a target whose registration job is still
running (the gateway died), and a target whose registration failed.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
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
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from server.registry import database_url


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


CLASSIFIER = b"\x00classifier-npz\xff" * 50
CORRUPTION = b'{"method": "add_noise_first_n", "strength": 0.5, "dims": null, "seed": 0}'


def make_v1_registry(url: str) -> dict[str, str]:
    """A schema-1 registry with three targets; their ids by role (and the running job's id)."""
    engine = create_engine(database_url(url))
    _Base.metadata.create_all(engine)
    spec: dict[str, Any] = {
        "description": "",
        "aliases": ["x"],
        "forget_examples": ['["Who is x?", null]'],
        "retain_examples": ["Who is y?"],
        "mode": "eco",
    }
    with Session(engine, expire_on_commit=False) as s, s.begin():
        s.add(_Meta(key="schema_version", value="1"))
        s.add(_Meta(key="revision", value="7"))
        active = _Target(
            id="a" * 32, name="Active", status="active", version=1, options={"fpr": 0.02},
            calibration={"classifier": {"threshold": 0.9}}, threshold_override=0.8, **spec,
        )  # fmt: skip
        running = _Target(id="r" * 32, name="Running", status="training", options={}, **spec)
        failed = _Target(
            id="f" * 32, name="Failed", status="failed", error="ValueError: boom", options={},
            **spec,
        )  # fmt: skip
        s.add_all([active, running, failed])
        s.flush()
        for kind, data in (("classifier", CLASSIFIER), ("corruption", CORRUPTION)):
            s.add(
                _Artifact(
                    target_id=active.id, version=1, kind=kind, data=data,
                    sha256=hashlib.sha256(data).hexdigest(), meta={"format": kind},
                )
            )  # fmt: skip
        s.add(_Job(id="j1" + "0" * 30, target_id=active.id, kind="register", status="succeeded"))
        s.add(_Job(id="j2" + "0" * 30, target_id=running.id, kind="register", status="running"))
        s.add(
            _Job(
                id="j3" + "0" * 30, target_id=failed.id, kind="register", status="failed",
                error="ValueError: boom",
            )
        )  # fmt: skip
    engine.dispose()
    return {"active": active.id, "running": running.id, "failed": failed.id, "job": "j2" + "0" * 30}
