"""Files every replica can fetch from the registry: content-addressed, chunked, checksummed.

δ targets need their small models (folders of a few hundred MB) on every gateway, and replicas
share no disk. A folder is stored as a *bundle*: a manifest of its files, each file a blob named
by its sha256 and split into chunks of `CHUNK_BYTES` (one row each, so no row is large). A blob
is written in one transaction: its row exists only once all its chunks do. Reading streams the
chunks to a temporary file, checks the size and sha256, and renames it into the local cache, so a
cached folder is always complete. Identical files (one base model under many targets) are stored
once; a blob no artifact refers to is deleted `GC_GRACE_S` after it was last used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from server.registry_schema import ArtifactRow, BlobChunkRow, BlobRow, now_utc

logger = logging.getLogger(__name__)

CHUNK_BYTES = 8 * 1024 * 1024
GC_GRACE_S = 3600.0
_COMPLETE = ".obliviate-bundle"


class BlobError(Exception):
    """A blob is missing or fails its checksum."""


Manifest = dict[str, Any]  # {"files": [{"path", "sha256", "size"}, ...]}


def file_digest(path: Path) -> tuple[str, int]:
    """sha256 hex digest and size of a file, read in chunks."""
    digest, size = hashlib.sha256(), 0
    with path.open("rb") as f:
        while block := f.read(CHUNK_BYTES):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


def bundle_digest(manifest: Mapping[str, Any]) -> str:
    """The name of a bundle: the sha256 of its canonical manifest."""
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


def manifest_blobs(manifest: Mapping[str, Any]) -> list[str]:
    return [str(f["sha256"]) for f in manifest.get("files", [])]


class BlobStore:
    """Blob reads and writes over the registry's sessions (each method is its own transaction)."""

    def __init__(self, tx: Callable[[], AbstractContextManager[Session]]) -> None:
        self._tx = tx

    def has(self, digest: str) -> bool:
        with self._tx() as s:
            return s.get(BlobRow, digest) is not None

    def put_file(self, path: Path) -> tuple[str, int]:
        """Store a file (once per content); its digest and size."""
        digest, size = file_digest(path)
        with self._tx() as s:
            row = s.get(BlobRow, digest)
            if row is not None:
                row.used_at = now_utc()  # keeps it from collection while a job refers to it
                return digest, size
        chunks = 0
        try:
            with self._tx() as s:
                s.add(BlobRow(digest=digest, size=size, chunks=0))
                s.flush()
                check = hashlib.sha256()
                with path.open("rb") as f:
                    while block := f.read(CHUNK_BYTES):
                        check.update(block)
                        s.add(BlobChunkRow(digest=digest, seq=chunks, data=block))
                        s.flush()  # one chunk in memory at a time
                        s.expunge_all()
                        chunks += 1
                if check.hexdigest() != digest:
                    raise BlobError(f"{path} changed while it was being stored")
                row = s.get(BlobRow, digest)
                assert row is not None
                row.chunks = chunks
        except IntegrityError:  # another replica stored the same content at the same time
            if not self.has(digest):
                raise
        return digest, size

    def read_to(self, digest: str, size: int, dest: Path) -> None:
        """Write a blob to `dest` (atomically), checking its size and sha256."""
        with self._tx() as s:
            row = s.get(BlobRow, digest)
            if row is None:
                raise BlobError(f"blob {digest[:12]} is not in the registry")
            chunks = row.chunks
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.tmp")
        check, written = hashlib.sha256(), 0
        try:
            with tmp.open("wb") as f:
                for block in self._chunks(digest, chunks):
                    check.update(block)
                    written += len(block)
                    f.write(block)
                f.flush()
                os.fsync(f.fileno())
            if written != size or check.hexdigest() != digest:
                raise BlobError(
                    f"blob {digest[:12]} fails its checksum ({written} bytes read, {size} expected)"
                )
            tmp.replace(dest)
        finally:
            tmp.unlink(missing_ok=True)

    def _chunks(self, digest: str, chunks: int) -> Iterator[bytes]:
        for seq in range(chunks):  # one query per chunk: memory stays at one chunk
            with self._tx() as s:
                data = s.scalar(
                    select(BlobChunkRow.data).where(
                        BlobChunkRow.digest == digest, BlobChunkRow.seq == seq
                    )
                )
            if data is None:
                raise BlobError(f"blob {digest[:12]} misses chunk {seq}")
            yield bytes(data)

    def put_folder(self, folder: Path) -> Manifest:
        """Store every file of a folder; the manifest that rebuilds it."""
        files = []
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            rel = path.relative_to(folder).as_posix()
            if any(part.startswith(".") for part in Path(rel).parts):
                continue  # temporary and status files
            digest, size = self.put_file(path)
            files.append({"path": rel, "sha256": digest, "size": size})
        if not files:
            raise BlobError(f"{folder} holds no files")
        return {"files": files}

    def materialize(self, manifest: Mapping[str, Any], cache: Path) -> Path:
        """The bundle as a local folder under `cache` (fetched once, checked, then reused)."""
        out = cache / bundle_digest(manifest)
        if (out / _COMPLETE).is_file():
            return out
        cache.mkdir(parents=True, exist_ok=True)
        tmp = cache / f".{out.name}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            for entry in manifest["files"]:
                rel = Path(str(entry["path"]))
                if rel.is_absolute() or ".." in rel.parts:
                    raise BlobError(f"bundle path {rel} leaves its folder")
                dest = tmp / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                self.read_to(str(entry["sha256"]), int(entry["size"]), dest)
            (tmp / _COMPLETE).write_text(json.dumps(manifest, sort_keys=True))
            try:
                tmp.rename(out)
            except OSError:  # another worker of this replica finished it first
                if not (out / _COMPLETE).is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return out


def collect_garbage(s: Session, grace_s: float = GC_GRACE_S) -> int:
    """Delete blobs no artifact refers to, unused for `grace_s`; how many were deleted."""
    referenced: set[str] = set()
    for meta in s.scalars(select(ArtifactRow.meta)):
        referenced.update(str(d) for d in (meta or {}).get("blobs", []))
    cutoff = now_utc() - timedelta(seconds=grace_s)
    stale = [
        d
        for d in s.scalars(select(BlobRow.digest).where(BlobRow.used_at < cutoff))
        if d not in referenced
    ]
    for digest in stale:
        s.execute(delete(BlobChunkRow).where(BlobChunkRow.digest == digest))
        s.execute(delete(BlobRow).where(BlobRow.digest == digest))
    if stale:
        logger.info("Deleted %d unreferenced blobs from the registry", len(stale))
    return len(stale)


def touch(s: Session, digests: list[str]) -> list[str]:
    """Mark blobs as used now; the digests that are missing."""
    if not digests:
        return []
    found = set(s.scalars(select(BlobRow.digest).where(BlobRow.digest.in_(digests))))
    if found:
        s.query(BlobRow).filter(BlobRow.digest.in_(found)).update(
            {BlobRow.used_at: now_utc()}, synchronize_session=False
        )
    return [d for d in digests if d not in found]


def stored_bytes(s: Session) -> int:
    return int(s.scalar(select(func.coalesce(func.sum(BlobRow.size), 0))) or 0)
