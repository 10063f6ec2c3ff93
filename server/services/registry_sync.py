"""Keeps a gateway's active targets in step with a registry that other gateways change too."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from server.registry import Registry

logger = logging.getLogger(__name__)


class RegistryPoller:
    """Calls `on_change` whenever the registry's revision differs from the last one loaded.

    This is how a target registered, changed or deleted through one gateway reaches every other
    gateway on the same database: within `interval_s` plus the time `on_change` takes.
    """

    def __init__(
        self,
        registry: Registry,
        on_change: Callable[[], Awaitable[None]],
        *,
        interval_s: float,
        retry: Callable[[], bool] | None = None,
        retry_s: float = 30.0,
    ) -> None:
        self._registry = registry
        self._on_change = on_change
        self._interval_s = interval_s
        self._retry = retry
        self._retry_s = retry_s
        self._last_reload = time.monotonic()
        self._seen: int | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self, seen: int | None = None) -> None:
        """Start polling; `seen` is the revision already loaded (None: load at the first poll)."""
        self._seen = seen
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    async def poll_once(self) -> bool:
        """Reload if the revision moved; True when it did."""
        # Read the revision before reloading: a change committed during the reload moves it
        # again, so the next poll reloads once more instead of keeping a stale set.
        revision = await asyncio.to_thread(self._registry.revision)
        if revision == self._seen and not self._due_retry():
            return False
        await self._on_change()
        self._last_reload = time.monotonic()
        if revision != self._seen:
            logger.info("Registry revision %s -> %s: targets reloaded", self._seen, revision)
        self._seen = revision
        return True

    def _due_retry(self) -> bool:
        """A target failed to load (a transient fault?): try again every `retry_s`."""
        return (
            self._retry is not None
            and self._retry()
            and time.monotonic() - self._last_reload >= self._retry_s
        )

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                await self.poll_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                # The database may be briefly unreachable (failover, restart): keep serving the
                # targets already loaded and try again at the next tick.
                logger.exception("Polling the registry failed; keeping the loaded targets")
