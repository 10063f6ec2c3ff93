"""Registration jobs shared by every replica on one registry, each run under a renewed lease.

    every replica: loop ── claim_job(owner, lease) ── none: wait for a local wake-up or poll_s
                            └─ a job: run it; renew the lease every lease_s / 3
                                  ├─ renewal says "not yours" (taken over, target deleted) ─> stop
                                  ├─ renewal impossible for a whole lease (database away)  ─> stop
                                  └─ done: the job's own final write is fenced by (owner, attempt)

A replica killed mid-job stops renewing; once its lease has expired the next replica to poll
claims the job (attempt + 1) and runs it again from its inputs in the registry (plus any
checkpoint). A finished job is never claimed again, and the fence makes sure that only the
current claim can finish it, so every job finishes exactly once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from server.registry import JobRecord, LeaseLostError, Registry

logger = logging.getLogger(__name__)


def replica_id() -> str:
    """This process's name in job leases: host, pid and a random suffix (pids are reused)."""
    return f"{socket.gethostname()[:80]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


@dataclass(frozen=True)
class LeaseConfig:
    lease_s: float = 30.0
    """A job's lease; a replica that stops renewing loses the job this long after."""
    poll_s: float = 1.0
    """How often an idle replica looks for jobs queued elsewhere or left by a dead replica."""


@dataclass
class Lease:
    """This replica's claim on one job; `attempt` is the fencing token of every write."""

    job: JobRecord
    owner: str
    lost: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def attempt(self) -> int:
        return self.job.attempts


class JobRunner:
    """Claims jobs from the registry and runs them one at a time under a renewed lease."""

    def __init__(
        self,
        registry: Registry,
        run: Callable[[Lease], Coroutine[Any, Any, None]],
        *,
        owner: str | None = None,
        config: LeaseConfig = LeaseConfig(),
        prepare: Callable[[], Coroutine[Any, Any, None]] | None = None,
    ) -> None:
        self._registry = registry
        self._run = run
        self.owner = owner or replica_id()
        self._config = config
        self._prepare = prepare
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._current: Lease | None = None

    def wake(self) -> None:
        """A job was just queued here: look now instead of at the next poll."""
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        """Stop working; a job in progress is handed back so another replica takes it at once."""
        if self._task is None:
            return
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        self._task = None
        lease = self._current
        if lease is not None and not lease.lost.is_set():
            try:
                await asyncio.to_thread(
                    self._registry.release_job, lease.job.id, lease.owner, lease.attempt
                )
                logger.info("Handed job %s back to the registry", lease.job.id)
            except Exception:
                logger.exception("Could not hand job %s back; its lease will expire", lease.job.id)

    async def _loop(self) -> None:
        if self._prepare is not None:
            await self._prepare()  # a replica claims jobs only once it can work on them
        while True:
            try:
                job = await asyncio.to_thread(
                    self._registry.claim_job, self.owner, self._config.lease_s
                )
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("Could not look for jobs in the registry; retrying")
                job = None
            if job is None:
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout=self._config.poll_s)
                except TimeoutError:
                    pass
                self._wake.clear()
                continue
            if job.attempts > 1:
                logger.info("Took over job %s (attempt %d)", job.id, job.attempts)
            await self._execute(Lease(job, self.owner))

    async def _execute(self, lease: Lease) -> None:
        self._current = lease
        work = asyncio.create_task(self._run(lease))
        keeper = asyncio.create_task(self._keep(lease, work))
        try:
            await work
        except asyncio.CancelledError:
            if not lease.lost.is_set():
                raise  # this replica is stopping
            logger.warning("Job %s stopped: this replica lost its lease", lease.job.id)
        except LeaseLostError as e:
            logger.warning("Job %s stopped: %s", lease.job.id, e)
        except Exception as e:
            logger.exception("Job %s failed", lease.job.id)
            await self._fail(lease, f"{type(e).__name__}: {e}")
        finally:
            keeper.cancel()
            self._current = None

    async def _fail(self, lease: Lease, message: str) -> None:
        try:
            await asyncio.to_thread(
                lambda: self._registry.fail_job(
                    lease.job.id, message, owner=lease.owner, attempt=lease.attempt
                )
            )
        except LeaseLostError:
            pass  # someone else has it now; their outcome counts
        except Exception:  # the registry is down too: the lease expires and the job re-runs
            logger.exception("Could not record the failure of job %s", lease.job.id)

    async def _keep(self, lease: Lease, work: asyncio.Task[None]) -> None:
        """Renew the lease every third of it; stop the work once it is no longer ours."""
        period = self._config.lease_s / 3
        renewed = time.monotonic()
        while True:
            await asyncio.sleep(period)
            try:
                ours = await asyncio.to_thread(
                    self._registry.renew_lease,
                    lease.job.id,
                    lease.owner,
                    lease.attempt,
                    self._config.lease_s,
                )
            except Exception:
                logger.exception("Could not renew the lease of job %s", lease.job.id)
                # Past most of a lease without renewal, another replica may already have it.
                ours = time.monotonic() - renewed < 0.8 * self._config.lease_s
            else:
                if ours:
                    renewed = time.monotonic()
            if not ours:
                lease.lost.set()
                work.cancel()
                return
