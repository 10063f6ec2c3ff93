"""A dedicated worker thread that runs a batch function over whatever calls are waiting.

The guard classifies every request. Under a burst, 32 requests arrive within milliseconds; one
`classify([text])` each on asyncio's shared default pool means 32 small calls contending for the
GIL and for the pool with everything else that uses `asyncio.to_thread`. `BatchingExecutor` has
one thread of its own: a call that finds it idle runs at once, alone; calls that arrive while it
works wait, and the next run takes all of them in one `fn(items)` call (one tokenizer pass, one
matrix product for the lot). No timer, so a lone request never waits for company.

If a batched call raises, every item is retried on its own, so one input that breaks the
function fails only its own call, never the others in its batch.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Generic, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


def _results(fn: Callable[[list[T]], Sequence[R]], items: list[T]) -> Sequence[R]:
    """`fn(items)`, which must give one result per item."""
    results = fn(items)
    if len(results) != len(items):
        raise RuntimeError(f"{len(results)} results for {len(items)} items")
    return results


class BatchingExecutor(Generic[T, R]):
    """`await submit(item)` -> `fn([... item ...])[i]`, batching the calls that wait together."""

    def __init__(
        self,
        fn: Callable[[list[T]], Sequence[R]],
        *,
        max_batch: int = 64,
        name: str = "batching",
        initializer: Callable[[], None] | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self._fn = fn
        self._max_batch = max_batch
        self._initializer = initializer
        self._waiting: list[tuple[T, Future[R]]] = []
        self._cond = threading.Condition()
        self._closed = False
        self.batches = 0
        """How many times `fn` ran (for tests and metrics)."""
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    async def submit(self, item: T) -> R:
        """The result for `item`, computed on the worker thread (possibly with other items)."""
        future: Future[R] = Future()
        with self._cond:
            if self._closed:
                raise RuntimeError("the executor is closed")
            self._waiting.append((item, future))
            self._cond.notify()
        return await asyncio.wrap_future(future)

    def close(self) -> None:
        """Finish what is waiting, then stop the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        if self._initializer is not None:
            self._initializer()
        while True:
            with self._cond:
                while not self._waiting and not self._closed:
                    self._cond.wait()
                if not self._waiting:
                    return  # closed and drained
                batch = self._waiting[: self._max_batch]
                del self._waiting[: self._max_batch]
            live = [(item, f) for item, f in batch if f.set_running_or_notify_cancel()]
            if live:
                self._process(live)

    def _process(self, batch: list[tuple[T, Future[R]]]) -> None:
        self.batches += 1
        try:
            results = _results(self._fn, [item for item, _ in batch])
        except BaseException as e:
            if len(batch) == 1:
                batch[0][1].set_exception(e)
                return
            logger.warning("A batch of %d failed (%s); retrying one by one", len(batch), e)
            for pair in batch:
                self._process([pair])
            return
        for (_, future), result in zip(batch, results, strict=True):
            future.set_result(result)


class LoopBatcher(Generic[T, R]):
    """`await submit(item)` -> `fn([... item ...])[i]`, run on the event loop itself.

    The first call schedules one run (`loop.call_soon`) behind the callbacks already waiting;
    every call made before it runs joins it. For work of a millisecond or two per batch that a
    thread would make dearer: on a busy loop each time a worker thread hands the GIL back it
    waits up to the interpreter's switch interval (5 ms) to get it again (bench/gil_contention.py).

    A run takes at most `max_batch` calls, and with `max_size` calls whose sizes (given to
    `submit`) come to about that much (the call that reaches it is the last), so one run blocks
    the loop for a bounded time. The call that fills a batch reads it at once, in its own step,
    and goes on: under a burst the other callers' wake-ups then queue ahead of the requests that
    reach the loop after it, where a scheduled run would come after them. A partial batch waits
    for the scheduled run, and the next run is scheduled only once its results are set. If `fn`
    raises, every call of the batch raises it: callers have their own fallback.
    """

    def __init__(
        self,
        fn: Callable[[list[T]], Sequence[R]],
        *,
        max_batch: int = 64,
        max_size: int | None = None,
    ) -> None:
        if max_batch < 1 or (max_size is not None and max_size < 1):
            raise ValueError("max_batch and max_size must be >= 1")
        self._fn = fn
        self._max_batch = max_batch
        self._max_size = max_size
        self._waiting: list[tuple[T, asyncio.Future[R], int]] = []  # (item, future, size)
        self._size = 0  # the sizes of the waiting calls, summed
        self._scheduled = False
        self.batches = 0
        """How many times `fn` ran (for tests and metrics)."""

    async def submit(self, item: T, size: int = 1) -> R:
        """The result for `item` (of `size`, counted against `max_size`), computed on this loop
        (possibly with other items)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        self._waiting.append((item, future, size))
        self._size += size
        if len(self._waiting) >= self._max_batch or (
            self._max_size is not None and self._size >= self._max_size
        ):
            # A full batch is read now, in this caller's step: its callers' wake-ups are
            # queued ahead of whatever reaches the loop later (the rest of a burst's requests).
            if batch := self._take():
                self._process(batch)
        elif not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._run)
        return await future

    def _take(self) -> list[tuple[T, asyncio.Future[R]]]:
        """The next batch's calls, less those cancelled meanwhile. (No more than a batch ever
        waits: the call that fills one reads it.)"""
        taken = self._waiting[: self._max_batch]
        del self._waiting[: self._max_batch]
        self._size -= sum(s for _, _, s in taken)
        return [(item, f) for item, f, _ in taken if not f.done()]

    def _run(self) -> None:
        try:
            if batch := self._take():
                self._process(batch)
        finally:
            # After the results: their callers' wake-ups are queued ahead of the next run.
            self._scheduled = bool(self._waiting)
            if self._scheduled:
                asyncio.get_running_loop().call_soon(self._run)

    def _process(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        self.batches += 1
        try:
            results = _results(self._fn, [item for item, _ in batch])
        except Exception as e:
            for _, future in batch:
                future.set_exception(e)
            return
        for (_, future), result in zip(batch, results, strict=True):
            future.set_result(result)
