"""Decision counters over time, and the audit trail that never keeps prompt text."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from server.metrics import Metrics
from server.services.activity import (
    AUDIT_LOGGER,
    ActivityRecorder,
    AuditTrail,
    describe_activity,
    describe_audit,
    parse_audit,
)

# The guard's audit line (server/services/guard.py), as written with --log-prompts true.
AUDIT_FORMAT = (
    "flagged request_id=%s target_id=%s action=%s score=%.4f threshold=%.4f positions=%s%s"
)


def test_buckets_are_the_differences_of_the_counters() -> None:
    metrics = Metrics()
    recorder = ActivityRecorder(metrics, bucket_s=60, keep=3)
    metrics.decisions.labels("none", "pass", "-").inc(5)
    recorder.sample(now=0.0)
    metrics.decisions.labels("t1", "corrupt", "-").inc(2)
    metrics.decisions.labels("none", "pass", "-").inc(1)
    recorder.sample(now=60.0)
    metrics.decisions.labels("t1", "corrupt", "-").inc(1)
    metrics.decisions.labels("t2", "delta", "-").inc(4)
    buckets = recorder.buckets(now=90.0)
    assert [(b.start, b.end, b.passed, b.flagged) for b in buckets] == [
        (0.0, 60.0, 1, {"t1": 2}),
        (60.0, 90.0, 0, {"t1": 1, "t2": 4}),
    ]
    for t in (120.0, 180.0, 240.0):
        recorder.sample(now=t)
    assert len(recorder.buckets(now=250.0)) == 4  # keep=3 whole buckets, plus the running one

    data = describe_activity(recorder, {"t1": "Harry Potter", "t3": "Quiet one"})
    assert data.passed == 6
    by_id = {t.target_id: t for t in data.targets}
    assert by_id["t1"].flagged == 3 and by_id["t1"].name == "Harry Potter"
    assert by_id["t2"].name is None and by_id["t2"].by_action == {"delta": 4}  # deleted since
    assert by_id["t3"].flagged == 0  # registered, never flagged: listed with zero


@pytest.fixture
def trail() -> Iterator[AuditTrail]:
    trail = AuditTrail(size=3)
    trail.install()
    yield trail
    trail.remove()


def test_the_trail_keeps_ids_and_scores_never_the_prompt(trail: AuditTrail) -> None:
    prompt = " prompt='Who wrote Harry Potter? target_id=evil action=none score=0'"
    logging.getLogger(AUDIT_LOGGER).info(
        AUDIT_FORMAT, "req-1", "t1", "corrupt", 0.9981, 0.0135, 6, prompt
    )
    logging.getLogger(AUDIT_LOGGER).info(AUDIT_FORMAT, "req-2", "t2", "delta", 0.5, 0.4, None, "")
    logging.getLogger(AUDIT_LOGGER).info("something else entirely")
    newest, oldest = trail.entries()
    assert (oldest.request_id, oldest.target_id, oldest.action) == ("req-1", "t1", "corrupt")
    assert (oldest.score, oldest.threshold, oldest.positions) == (0.9981, 0.0135, 6)
    assert newest.positions is None and newest.action == "delta"
    assert "Harry" not in repr(trail.entries())
    listed = describe_audit(trail, {"t1": "Harry Potter"}).data
    assert [e.target for e in listed] == [None, "Harry Potter"]
    assert parse_audit("flagged request_id=x") is None  # not a decision line


def test_the_trail_keeps_only_the_latest(trail: AuditTrail) -> None:
    for i in range(5):
        logging.getLogger(AUDIT_LOGGER).info(AUDIT_FORMAT, f"r{i}", "t", "corrupt", 1, 0.5, 1, "")
    assert [e.request_id for e in trail.entries()] == ["r4", "r3", "r2"]


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.mark.parametrize(("level", "printed"), [(logging.WARNING, 0), (logging.INFO, 1)])
def test_the_log_prints_audit_lines_as_its_level_says(level: int, printed: int) -> None:
    root, audit = logging.getLogger(), logging.getLogger(AUDIT_LOGGER)
    saved, handler = root.level, _Collect()
    root.addHandler(handler)
    root.setLevel(level)
    trail = AuditTrail()
    trail.install()
    try:
        audit.info(AUDIT_FORMAT, "r", "t", "corrupt", 1, 0.5, 1, "")
        assert len(trail.entries()) == 1  # the console sees it whatever the log level
        assert len([r for r in handler.records if r.name == AUDIT_LOGGER]) == printed
    finally:
        trail.remove()
        root.removeHandler(handler)
        root.setLevel(saved)
    assert audit.level == logging.NOTSET and audit.propagate  # as it was
