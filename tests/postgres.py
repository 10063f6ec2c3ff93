"""A throwaway PostgreSQL server for tests: initdb + pg_ctl into a temp dir on a free port.

Uses the Debian `postgresql` package's binaries (scripts/setup.sh installs it). initdb refuses
to run as root, so under root the server runs as the package's `postgres` user.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from server.launch import free_port


class PostgresUnavailable(Exception):
    """No PostgreSQL server can be started here (the message says why)."""


def find_pg_bin() -> Path | None:
    """The folder with initdb and pg_ctl: on PATH, else the newest /usr/lib/postgresql/*/bin."""
    on_path = shutil.which("pg_ctl")
    if on_path and shutil.which("initdb"):
        return Path(on_path).resolve().parent
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"),
        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0,
    )
    return Path(found[-1]).parent if found else None


@contextmanager
def running_postgres() -> Iterator[str]:
    """Start a server; yield a superuser URL (postgresql://obliviate@127.0.0.1:PORT/postgres)."""
    bindir = find_pg_bin()
    if bindir is None:
        raise PostgresUnavailable(
            "PostgreSQL is not installed (no initdb/pg_ctl): `apt-get install postgresql`, which "
            "scripts/setup.sh runs on Debian machines"
        )
    user: str | None = None
    if os.geteuid() == 0:
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError as e:
            raise PostgresUnavailable("running as root and there is no `postgres` user") from e
        user = "postgres"
    # Not under pytest's tmp_path: its parents are 0700 root, unreadable by `postgres`.
    base = Path(tempfile.mkdtemp(prefix="obliviate-pg-"))
    if user is not None:
        os.chown(base, pw.pw_uid, pw.pw_gid)
    data, log, port = base / "data", base / "postgres.log", free_port()

    def run(*argv: str) -> None:
        result = subprocess.run(
            argv, user=user, capture_output=True, text=True, check=False, cwd=base, timeout=120
        )
        if result.returncode != 0:
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise PostgresUnavailable(
                f"{' '.join(argv)} failed ({result.returncode}): {result.stderr[-2000:]}\n{tail}"
            )

    try:
        run(
            str(bindir / "initdb"),
            "-D", str(data), "-U", "obliviate", "--auth=trust", "-E", "UTF8", "--no-sync",
        )  # fmt: skip
        run(
            str(bindir / "pg_ctl"),
            "-D", str(data), "-l", str(log), "-w", "-t", "60",
            "-o", f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off",
            "start",
        )  # fmt: skip
    except BaseException:
        shutil.rmtree(base, ignore_errors=True)
        raise
    try:
        yield f"postgresql://obliviate@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(
            [str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
            user=user,
            capture_output=True,
            check=False,
            cwd=base,
            timeout=60,
        )
        shutil.rmtree(base, ignore_errors=True)


def create_database(server_url: str, prefix: str = "test") -> str:
    """A fresh, empty database on the server; its URL."""
    import psycopg

    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')  # name is ours: [a-z0-9_] only
    return server_url.rsplit("/", 1)[0] + f"/{name}"
