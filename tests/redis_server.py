"""A throwaway Redis server for tests: Debian's redis-server on a free port, no persistence.

scripts/setup.sh installs the `redis-server` package when it is missing.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from server.launch import free_port


class RedisUnavailable(Exception):
    """No Redis server can be started here (the message says why)."""


@contextmanager
def running_redis() -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Start redis-server; yield its URL and process (tests may kill it)."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RedisUnavailable(
            "redis-server is not installed: `apt-get install redis-server`, which "
            "scripts/setup.sh runs on Debian machines"
        )
    base = Path(tempfile.mkdtemp(prefix="obliviate-redis-"))
    port = free_port()
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen(
        [*argv, "--dir", str(base)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
    )
    try:
        import redis

        client = redis.Redis(port=port, socket_timeout=1)
        deadline = time.monotonic() + 30
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RedisUnavailable(
                        f"redis-server did not start (rc {proc.poll()})"
                    ) from None
                time.sleep(0.05)
        client.close()
        yield f"redis://127.0.0.1:{port}/0", proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=10)
        shutil.rmtree(base, ignore_errors=True)
