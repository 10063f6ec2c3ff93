"""The gateway's long-lived heap and Python's cycle collector.

A gateway process holds ~0.8 M objects that live as long as it does: torch, vLLM, transformers,
the tokenizer, the classifier. A full (generation 2) collection walks all of them: 0.4-0.9 s on
2 CPU cores, during which no thread of the process runs, so every request in flight stalls,
seen as a p99 of most of a second under a burst. vLLM's own OpenAI server moves its startup heap
into the permanent generation once it is up (`freeze_gc_heap`); the gateway does the same once
its engine is up. Objects freed by reference counting still go; cyclic garbage among the
frozen ones stays, and what startup built lives as long as the process anyway.

Only a gateway that owns its process does this (it built its engine): an app embedded with an
injected engine leaves the host's collector alone.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import Gauge, Histogram


def freeze_heap(frozen: Gauge | None = None) -> int:
    """Collect, then move every object alive now into the permanent generation; how many are
    frozen in all, also set on `frozen` (counted once here: `gc.get_freeze_count()` walks
    the whole permanent generation, tens of ms for a gateway's heap)."""
    gc.collect()
    gc.freeze()
    count = gc.get_freeze_count()
    if frozen is not None:
        frozen.set(count)
    return count


def watch_pauses(pauses: Histogram) -> Callable[[], None]:
    """Time every collection into `pauses` (labelled by generation); returns the undo."""
    started: list[float] = []

    def callback(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            started[:] = [time.perf_counter()]
        elif started:
            pauses.labels(str(info["generation"])).observe(time.perf_counter() - started[0])

    gc.callbacks.append(callback)

    def remove() -> None:
        if callback in gc.callbacks:
            gc.callbacks.remove(callback)

    return remove
