"""What happens when the guard itself fails on a request (`guard.fail_closed`).

protect(prompt) ──> inner guard
    ├─ a GatewayError (a deliberate refusal)   ──> raised as it is
    └─ any other error (classifier bug, OOM…)  ──> logged (no prompt text), counted, then
          fail closed (default): treated as flagged: the content of every turn corrupted with
                                 the default spec, every δ offset applied; without a local
                                 model, refused (503)
          fail open:             the prompt goes to the engine untouched (not recommended)
"""

from __future__ import annotations

import asyncio
import logging

from corruption import CorruptionSpec
from offset import DeltaSpec
from server.engine import ChatPrompt, TextPrompt, TokenPrompt
from server.errors import GatewayError, UnavailableError
from server.metrics import Metrics
from server.services.corruptor import PromptCorruptor
from server.services.generation import PromptGuard
from server.services.guard import Guarded
from server.services.tenancy import Caller

logger = logging.getLogger(__name__)


class FailSafeGuard:
    """`PromptGuard` wrapper that decides what a guard failure means for the request."""

    def __init__(
        self,
        inner: PromptGuard,
        corruptor: PromptCorruptor | None,
        metrics: Metrics,
        *,
        fail_closed: bool,
    ) -> None:
        self._inner = inner
        self._corruptor = corruptor
        self._metrics = metrics
        self._fail_closed = fail_closed
        self.failures = 0

    async def protect(
        self,
        prompt: ChatPrompt | TextPrompt | TokenPrompt,
        request_id: str,
        caller: Caller | None = None,
    ) -> Guarded:
        tenant = caller.label if caller else "-"
        try:
            return await self._inner.protect(prompt, request_id, caller)
        except (GatewayError, asyncio.CancelledError):
            raise
        except Exception as e:
            self.failures += 1
            logger.error(
                "The guard failed on request_id=%s (%s); %s",
                request_id,
                type(e).__name__,
                "treating it as flagged" if self._fail_closed else "sending it unguarded",
            )
            if not self._fail_closed:
                self._metrics.decisions.labels("none", "guard_error_pass", tenant).inc()
                return Guarded(prompt)
        self._metrics.decisions.labels("none", "guard_error_corrupt", tenant).inc()
        if self._corruptor is None:
            raise UnavailableError(
                "The guard could not check this request and the gateway is set to fail closed "
                "(guard.fail_closed); it was not sent.",
                code="guard_unavailable",
            )
        spec: CorruptionSpec = self._corruptor.default_spec()
        corrupted, _ = await asyncio.to_thread(self._corruptor.corrupt, prompt, (), fallback=spec)
        return Guarded(corrupted, self._all_offsets(caller))

    def _all_offsets(self, caller: Caller | None) -> tuple[DeltaSpec, ...]:
        """Failing closed also applies every δ target's offset in the caller's scope (the guard
        could not tell which ones the prompt concerns)."""
        in_scope = getattr(self._inner, "in_scope", None)
        active = in_scope(caller) if in_scope is not None else getattr(self._inner, "active", {})
        return tuple(t.offset for t in active.values() if getattr(t, "offset", None) is not None)
