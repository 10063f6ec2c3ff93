"""The engine started on a prompt while the guard still reads it; nothing read before the verdict.

    prime(prompt)
      ├─ EarlyStart(engine, request as sent if unflagged)   the engine takes the prompt now:
      │                                                     its prefill overlaps the guard's read
      ├─ guard.protect(prompt)                              the verdict
      ├─ unflagged (the same request) ──> the early stream goes to the output guard, first
      │                                   chunk first: the client gets what the engine would
      │                                   have written had it been sent after the verdict
      └─ anything else (flagged, an error, the client gone) ──> the early request is aborted
                                          unread; the protected prompt is sent as without it

Under a burst the guard reads a pass's prompts at once, after the last has come in
(server.services.batching.LoopBatcher): without this, the first prompts of a burst wait for the
read of the last before the engine gets them. Only for an engine that shows what it is sent to
no one (`Engine.starts_early`: a local vLLM): an upstream service would receive prompts the
guard then refuses. Nothing of the early stream reaches the client unless the verdict leaves the
request as it was started: its chunks wait in the engine's queue, and aborting it drops them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from server.engine import Engine, GenerationChunk, GenerationRequest


class EarlyStart:
    """`engine.generate(sent)` started now for `request`; read through `stream_for` only."""

    def __init__(self, engine: Engine, request: GenerationRequest, sent: GenerationRequest) -> None:
        self.request = request
        """The request as the service builds it for an unflagged prompt."""
        self.sent = sent
        """What the engine was sent for it (as the output guard sends `request`)."""
        self._stream = aiter(engine.generate(sent))
        self._first: asyncio.Task[GenerationChunk | None] = asyncio.ensure_future(self._read())
        self._taken = False
        self.handed_over = False
        """Set once the verdict kept it: from then on its reader owns it (and closes it)."""

    async def _read(self) -> GenerationChunk | None:
        # Awaiting the first chunk is what makes the engine take the request; the chunk waits
        # here, unread, until the verdict.
        try:
            return await anext(self._stream)
        except StopAsyncIteration:
            return None

    def stream_for(self, sent: GenerationRequest, engine: Engine) -> AsyncIterator[GenerationChunk]:
        """The stream for `sent`: the early one if it is what was started (once), else the
        early request aborted and `engine.generate(sent)`."""
        if not self._taken and sent == self.sent:
            self._taken = True
            return self._kept()
        return self._instead(engine, sent)

    async def _kept(self) -> AsyncIterator[GenerationChunk]:
        try:
            first = await self._first
            if first is None:
                return
            yield first
            async for chunk in self._stream:
                yield chunk
        finally:
            await self.abort()

    async def _instead(
        self, engine: Engine, sent: GenerationRequest
    ) -> AsyncIterator[GenerationChunk]:
        await self.abort()
        async for chunk in engine.generate(sent):
            yield chunk

    async def abort(self) -> None:
        """Stop the early request (closing its stream aborts it in the engine); idempotent.
        Whatever it wrote, or the error it ended with, is dropped unread."""
        if not self._first.done():
            self._first.cancel()
        await asyncio.gather(self._first, return_exceptions=True)
        aclose = getattr(self._stream, "aclose", None)
        if aclose is not None:
            await aclose()
