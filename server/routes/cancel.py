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
    """Await `work`, cancelling it (and so aborting the engine request) on disconnect.

    `work` runs in the request's own task, straight on from the route: a task of its own would
    put the request's way to the guard one event-loop pass behind every request that arrived
    with it. A watcher task cancels this one when the client hangs up. (Starting the watcher
    50 ms in, so that short requests never need one, cost a burst's event loop more: a timer
    per request, and the watchers of longer ones all the same.)"""
    task = asyncio.current_task()
    assert task is not None  # a route always runs in a task
    running = True
    gone = False

    def hung_up(done: asyncio.Future[None]) -> None:
        nonlocal gone
        if running and not done.cancelled() and done.exception() is None:
            gone = True
            task.cancel()

    watcher = asyncio.ensure_future(_disconnected(request))
    watcher.add_done_callback(hung_up)
    try:
        return await work
    except asyncio.CancelledError:
        if not gone:
            raise  # cancelled from outside (shutdown): not ours to turn into an answer
        task.uncancel()
        raise ClientDisconnectedError("The client closed the connection") from None
    finally:
        running = False
        watcher.cancel()
