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


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def run_cancellable(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it (and so aborting the engine request) on disconnect."""
    handler = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({handler, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not handler.done():
        handler.cancel()
        raise ClientDisconnectedError("The client closed the connection")
    return handler.result()
