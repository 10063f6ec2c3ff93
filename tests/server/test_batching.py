import asyncio
import threading

import pytest

from server.services.batching import BatchingExecutor, LoopBatcher


class Recorder:
    """A batch function that records its batches and can be held until released."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.threads: set[str] = set()
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, items: list[str]) -> list[str]:
        self.gate.wait(timeout=10)
        self.batches.append(list(items))
        self.threads.add(threading.current_thread().name)
        if "bad" in items:
            raise ValueError("bad input")
        return [item.upper() for item in items]


async def test_a_lone_call_runs_at_once_on_the_dedicated_thread():
    fn = Recorder()
    executor = BatchingExecutor(fn, name="guard-test")
    assert await executor.submit("a") == "A"
    assert fn.batches == [["a"]] and fn.threads == {"guard-test"}
    executor.close()


async def test_calls_waiting_together_run_as_one_batch():
    fn = Recorder()
    executor = BatchingExecutor(fn, max_batch=8)
    fn.gate.clear()  # the first call holds the thread while the burst arrives
    first = asyncio.ensure_future(executor.submit("first"))
    while executor.batches == 0:  # the worker took `first` and waits at the gate
        await asyncio.sleep(0.01)
    burst = [asyncio.ensure_future(executor.submit(f"r{i}")) for i in range(10)]
    await asyncio.sleep(0.05)
    fn.gate.set()
    results = await asyncio.gather(first, *burst)
    assert results == ["FIRST", *(f"R{i}" for i in range(10))]
    assert [len(b) for b in fn.batches] == [1, 8, 2]  # max_batch bounds a batch
    executor.close()


async def test_one_bad_input_fails_only_its_own_call():
    fn = Recorder()
    executor = BatchingExecutor(fn)
    fn.gate.clear()
    first = asyncio.ensure_future(executor.submit("x"))
    while executor.batches == 0:
        await asyncio.sleep(0.01)
    calls = [asyncio.ensure_future(executor.submit(t)) for t in ("a", "bad", "b")]
    await asyncio.sleep(0.05)
    fn.gate.set()
    assert await first == "X"
    a, bad, b = await asyncio.gather(*calls, return_exceptions=True)
    assert (a, b) == ("A", "B")
    assert isinstance(bad, ValueError)
    assert fn.batches[1] == ["a", "bad", "b"]  # tried together, then one by one
    assert sorted(map(tuple, fn.batches[2:])) == [("a",), ("b",), ("bad",)]
    executor.close()


async def test_closed_executor_refuses_new_calls():
    executor = BatchingExecutor(Recorder())
    executor.close()
    with pytest.raises(RuntimeError, match="closed"):
        await executor.submit("a")


async def test_loop_batcher_runs_the_calls_of_one_pass_together_on_the_loop():
    fn = Recorder()
    batcher: LoopBatcher[str, str] = LoopBatcher(fn, max_batch=3)
    got = await asyncio.gather(*(batcher.submit(x) for x in "abcde"))
    assert got == ["A", "B", "C", "D", "E"]
    # Five calls made in one pass: batches of at most 3, on the loop's own thread.
    assert fn.batches == [["a", "b", "c"], ["d", "e"]]
    assert fn.threads == {threading.current_thread().name}
    assert await batcher.submit("f") == "F"  # a later call runs on its own
    assert fn.batches[-1] == ["f"]


async def test_loop_batcher_reads_a_full_batch_in_the_step_of_the_call_that_fills_it():
    """Under a burst a batch is read as soon as it is full, so its callers' wake-ups queue
    ahead of the requests that reach the loop after it; a partial batch waits for the pass."""
    events: list[str] = []

    def fn(items: list[str]) -> list[str]:
        events.append("run " + "".join(items))
        return [x.upper() for x in items]

    batcher: LoopBatcher[str, str] = LoopBatcher(fn, max_batch=2)

    async def call(x: str) -> None:
        events.append("submit " + x)
        await batcher.submit(x)
        events.append("resumed " + x)

    await asyncio.gather(*(call(x) for x in "abcde"))
    assert events == [
        "submit a",
        "submit b", "run ab", "resumed b",  # b filled the batch: read in b's step, b goes on
        "submit c",
        "submit d", "run cd", "resumed d",
        "submit e",
        "run e",  # the pass is over: the partial batch is read
        "resumed a", "resumed c", "resumed e",
    ]  # fmt: skip
    assert batcher.batches == 3


async def test_loop_batcher_reads_a_batch_once_its_items_reach_max_size():
    events: list[str] = []

    def fn(items: list[str]) -> list[str]:
        events.append("run " + ",".join(items))
        return [x.upper() for x in items]

    batcher: LoopBatcher[str, str] = LoopBatcher(fn, max_batch=10, max_size=5)

    async def call(x: str) -> None:
        events.append("submit " + x)
        await batcher.submit(x, len(x))

    # "ccc" reaches 5 (2 + 3 after "aa"): read at once; "dddddd" alone is over 5: read at once
    await asyncio.gather(*(call(x) for x in ["aa", "ccc", "dddddd", "e", "f"]))
    assert events == [
        "submit aa",
        "submit ccc", "run aa,ccc",
        "submit dddddd", "run dddddd",
        "submit e",
        "submit f",
        "run e,f",  # the pass is over: the partial batch is read
    ]  # fmt: skip


async def test_loop_batcher_fails_the_whole_batch_and_skips_cancelled_calls():
    fn = Recorder()
    batcher: LoopBatcher[str, str] = LoopBatcher(fn)
    gone = asyncio.ensure_future(batcher.submit("gone"))
    await asyncio.sleep(0)  # `gone` is queued
    gone.cancel()
    results = await asyncio.gather(
        batcher.submit("ok"), batcher.submit("bad"), return_exceptions=True
    )
    assert [type(r) for r in results] == [ValueError, ValueError]  # the caller falls back
    assert fn.batches == [["ok", "bad"]]  # the cancelled call was not computed
    assert await batcher.submit("again") == "AGAIN"
