"""Abort work whose client went away.

Assumption (as in vLLM's `with_cancellation`): the request body has been read before the
handler runs, so the only message left on `receive` is `http.disconnect`. Streams need no
watcher: Starlette cancels the response iterator, which closes the engine request.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from fastapi import Request

from server.errors import GatewayError

T = TypeVar("T")


class ClientDisconnectedError(GatewayError):
    status_code = 499
    error_type = "client_closed_request"


async def _cancel_on_disconnect(request: Request, handler: asyncio.Future[T]) -> None:
    """Wait for the client to go; then cancel `handler`."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            handler.cancel()
            return


async def run_cancellable(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it (and so aborting the engine request) on disconnect.

    `work` runs in a task of its own and a watcher cancels it when the client goes. Awaited
    directly (no `asyncio.wait`, ~12 us less a request), so the route's own cancellation
    reaches `work` too.
    """
    handler = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_cancel_on_disconnect(request, handler))
    try:
        return await handler
    except asyncio.CancelledError:
        route = asyncio.current_task()
        if watcher.done() and not watcher.cancelled() and not (route and route.cancelling()):
            raise ClientDisconnectedError("The client closed the connection") from None
        raise
    finally:
        watcher.cancel()
