"""Schema upgrades of an existing registry, in place, inside the creating transaction.

Schema 1 kept one flat row per target (spec, status and version together) and jobs without
leases. Schema 2 moves the spec into `obliviate_target_versions` (one row per version), keeps the
target row for what belongs to the target (name, enabled, threshold override, active version),
and gives jobs a version, an owner and a lease. Every schema-1 target survives with its artifacts:
an active target becomes version N (ready, active), a pending or training one keeps its job,
which now builds version N + 1, and a failed one keeps its error on that version.
"""

from __future__ import annotations

import sqlite3
from typing import Any

from sqlalchemy import (
    JSON,
    Column,
    Connection,
    DateTime,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    insert,
    inspect,
    select,
    text,
    update,
)

from server.registry_schema import Base, JobRow, VersionRow

_V1_TARGET_SPEC = (
    "description",
    "aliases",
    "forget_examples",
    "retain_examples",
    "mode",
    "options",
    "status",
    "version",
    "calibration",
    "error",
)


def _v1_targets() -> Table:
    """Schema 1's target table, as far as the upgrade reads it (JSON decoded per dialect)."""
    return Table(
        "obliviate_targets",
        MetaData(),
        Column("id", String(32), primary_key=True),
        Column("description", Text),
        Column("aliases", JSON),
        Column("forget_examples", JSON),
        Column("retain_examples", JSON),
        Column("mode", String(32)),
        Column("options", JSON),
        Column("status", String(16)),
        Column("version", Integer),
        Column("calibration", JSON),
        Column("error", Text),
        Column("created_at", DateTime(timezone=True)),
        Column("updated_at", DateTime(timezone=True)),
        Column("active_version", Integer),
    )


def upgrade(conn: Connection, found: int) -> None:
    """Bring a registry at schema `found` up to the current one (same transaction)."""
    if found < 2:
        _v1_to_v2(conn)


def _add_column(conn: Connection, table: str, ddl: str) -> None:
    conn.execute(text(f"ALTER TABLE {table} ADD COLUMN {ddl}"))


def _v1_to_v2(conn: Connection) -> None:
    if conn.dialect.name == "sqlite" and sqlite3.sqlite_version_info < (3, 35):
        raise RuntimeError(
            f"upgrading the registry needs SQLite >= 3.35 (ALTER TABLE DROP COLUMN); this Python "
            f"has {sqlite3.sqlite_version}"
        )
    Base.metadata.create_all(conn)  # the new tables only; existing ones are altered below
    _add_column(conn, "obliviate_targets", "active_version INTEGER")
    for ddl in (
        "version INTEGER",
        "owner VARCHAR(128)",
        "lease_expires_at FLOAT",
        "attempts INTEGER NOT NULL DEFAULT 0",
        "checkpoint JSON",
    ):
        _add_column(conn, "obliviate_jobs", ddl)

    old = _v1_targets()
    jobs = Base.metadata.tables[JobRow.__tablename__]
    versions = Base.metadata.tables[VersionRow.__tablename__]
    for row in conn.execute(select(old)).mappings().all():
        version, status = _v1_version(row)
        conn.execute(
            insert(versions).values(
                target_id=row["id"],
                version=version,
                description=row["description"] or "",
                aliases=list(row["aliases"] or []),
                forget_examples=list(row["forget_examples"] or []),
                retain_examples=list(row["retain_examples"] or []),
                mode=row["mode"],
                options=dict(row["options"] or {}),
                status=status,
                calibration=row["calibration"],
                error=row["error"] if status == "failed" else None,
                created_at=row["created_at"],
                updated_at=row["updated_at"],
                activated_at=row["updated_at"] if status == "ready" else None,
            )
        )
        active = version if status == "ready" else None
        conn.execute(update(old).where(old.c.id == row["id"]).values(active_version=active))
        # Schema 1 ran one job per target: it built the version recorded above.
        conn.execute(update(jobs).where(jobs.c.target_id == row["id"]).values(version=version))
        latest_job = conn.execute(
            select(jobs.c.id)
            .where(jobs.c.target_id == row["id"])
            .order_by(jobs.c.created_at.desc())
            .limit(1)
        ).scalar_one_or_none()
        conn.execute(
            update(versions)
            .where(versions.c.target_id == row["id"], versions.c.version == version)
            .values(job_id=latest_job)
        )
    present = {c["name"] for c in inspect(conn).get_columns("obliviate_targets")}
    for column in _V1_TARGET_SPEC:
        if column in present:
            conn.execute(text(f"ALTER TABLE obliviate_targets DROP COLUMN {column}"))


def _v1_version(row: Any) -> tuple[int, str]:
    """The version number and schema-2 status a schema-1 target row becomes."""
    status, version = row["status"], int(row["version"] or 0)
    if status == "active":
        return max(version, 1), "ready"
    # Pending, training or failed: the job builds (or failed to build) the next version.
    return version + 1, "failed" if status == "failed" else status


__all__ = ["upgrade"]
