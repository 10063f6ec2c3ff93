"""The gateway's heap: frozen once its engine is up, collections timed."""

from __future__ import annotations

import gc

from server.heap import freeze_heap, watch_pauses
from server.metrics import Metrics


def _count(metrics: Metrics, generation: str) -> float:
    value = metrics.registry.get_sample_value(
        "obliviate_gc_pause_seconds_count", {"generation": generation}
    )
    return value or 0.0


def test_every_collection_is_timed_until_the_watch_is_removed():
    metrics = Metrics()
    remove = watch_pauses(metrics.gc_pause_seconds)
    try:
        gc.collect()
        gc.collect(0)
        assert _count(metrics, "2") == 1
        assert _count(metrics, "0") >= 1
    finally:
        remove()
    gc.collect()
    assert _count(metrics, "2") == 1


def test_freezing_moves_the_live_heap_out_of_full_collections():
    kept = [[i] for i in range(10_000)]  # tracked containers, alive
    gc.unfreeze()
    try:
        metrics = Metrics()
        frozen = freeze_heap(metrics.gc_frozen)
        after = gc.get_freeze_count()
        # Threads left by other tests may free a few frozen objects in between (2 once, in
        # the full suite): the count is the one at the freeze, at most 1,000 above today's.
        assert after >= len(kept) and 0 <= frozen - after <= 1_000
        assert metrics.registry.get_sample_value("obliviate_gc_frozen_objects") == frozen
        # A full collection now walks only what was made since.
        assert len(gc.get_objects(2)) < frozen / 10
    finally:
        gc.unfreeze()


def test_a_scrape_does_not_walk_the_frozen_heap(monkeypatch):
    """gc.get_freeze_count() walks the whole permanent generation (~70 ms on the event loop
    for a gateway's heap): the gauge is set once, when the heap is frozen, not read at each
    scrape."""
    metrics = Metrics()
    metrics.gc_frozen.set(123_456)
    walks: list[int] = []
    monkeypatch.setattr(gc, "get_freeze_count", lambda: walks.append(1) or 0)
    rendered = metrics.registry.get_sample_value("obliviate_gc_frozen_objects")
    assert "obliviate_gc_frozen_objects 123456.0" in metrics.render().decode()
    assert rendered == 123_456
    assert walks == []
