"""vLLM's stop-string rules (`vllm/v1/engine/detokenizer.py`), for whatever applies a client's
stops to text outside the engine: the gateway's stops behind the output guard
(server/services/stops.py) and the δ decoder in front of an upstream (server/engine/
upstream_delta.py)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

__all__ = ["first_stop_string", "stop_buffer"]


def first_stop_string(text: str, new_chars: int, stops: Sequence[str]) -> tuple[str, int] | None:
    """The stop string that the last `new_chars` characters of `text` complete earliest (ties:
    list order) and where it starts; None when none does (vLLM's `check_stop_strings`)."""
    if not new_chars:
        return None
    best: tuple[str, int] | None = None
    best_end = sys.maxsize
    for stop in stops:
        if not stop:
            continue
        start = text.find(stop, max(0, len(text) - new_chars - len(stop) + 1))
        if start != -1 and start + len(stop) < best_end:
            best, best_end = (stop, start), start + len(stop)
    return best


def stop_buffer(stops: Sequence[str]) -> int:
    """Characters held back from a stream until no stop string can start in them (vLLM holds
    them back as well): a stop string is never cut from text already sent."""
    return max((len(s) for s in stops), default=1) - 1
