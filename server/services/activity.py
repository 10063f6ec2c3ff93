"""What the guard did, for operators: decision counters over time and the audit trail.

`ActivityRecorder` samples the gateway's own Prometheus counter of guard decisions
(`obliviate_guard_decisions{target, action}`, the numbers /metrics shows) every `bucket_s`
seconds and keeps the last `keep` samples, so the console can show flagged and passed requests
per time bucket without a Prometheus server. `AuditTrail` keeps the last audit lines the guard
logs (`obliviate.audit`) as structured entries: ids, action, score, threshold, never prompt text.
Both are this gateway's own view, since it started; the log and Prometheus keep the whole story.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from server.metrics import Metrics
from server.protocol.operations import (
    ActivityPoint,
    ActivityResponse,
    AuditEntry,
    AuditList,
    TargetActivity,
)

logger = logging.getLogger(__name__)

AUDIT_LOGGER = "obliviate.audit"
PASSED = "none"  # the decision counters' target label of requests no target flagged

Counts = Mapping[tuple[str, str], float]  # (target id | "none", action) -> running total


@dataclass(frozen=True)
class Bucket:
    start: float
    end: float
    passed: int
    flagged: dict[str, int]
    """Flagged requests by target id."""


class ActivityRecorder:
    """Samples the decision counters; differences of samples are the activity per bucket."""

    def __init__(self, metrics: Metrics, *, bucket_s: int = 60, keep: int = 60) -> None:
        self._metrics = metrics
        self.bucket_s = bucket_s
        self._samples: deque[tuple[float, Counts]] = deque(maxlen=keep + 1)
        self._task: asyncio.Task[None] | None = None
        self.since = time.time()

    def read(self) -> dict[tuple[str, str], float]:
        """The counters' running totals now."""
        totals: dict[tuple[str, str], float] = {}
        for family in self._metrics.decisions.collect():
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    key = (sample.labels["target"], sample.labels["action"])
                    totals[key] = sample.value
        return totals

    def sample(self, now: float | None = None) -> None:
        self._samples.append((now if now is not None else time.time(), self.read()))

    async def start(self) -> None:
        self.since = time.time()
        self.sample(self.since)
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.bucket_s)
            self.sample()

    def buckets(self, now: float | None = None) -> list[Bucket]:
        """Activity between consecutive samples, oldest first, the last one running until now."""
        points = [*self._samples, (now if now is not None else time.time(), self.read())]
        out = []
        for (start, before), (end, after) in zip(points, points[1:], strict=False):
            passed = 0
            flagged: dict[str, int] = {}
            for (target, action), total in after.items():
                delta = int(total - before.get((target, action), 0.0))
                if target == PASSED:
                    passed += delta
                elif delta:
                    flagged[target] = flagged.get(target, 0) + delta
            out.append(Bucket(start, end, passed, flagged))
        return out


@dataclass(frozen=True)
class AuditRecord:
    time: float
    request_id: str
    target_id: str
    action: str
    score: float | None
    threshold: float | None
    positions: int | None


# The guard writes `flagged request_id=... target_id=... action=... score=... threshold=...
# positions=...`, then ` prompt=...` only with --log-prompts. Only the part before ` prompt=` is
# read, so prompt text never reaches the trail, whatever it contains.
_FIELD = re.compile(r"(\w+)=(\S+)")


def parse_audit(message: str) -> dict[str, str] | None:
    """The key=value fields of an audit line, prompt text excluded; None if it is not one."""
    if not message.startswith("flagged "):
        return None
    head = message.split(" prompt=", 1)[0]
    fields = dict(_FIELD.findall(head))
    return fields if {"request_id", "target_id", "action"} <= fields.keys() else None


def _number(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


class AuditTrail(logging.Handler):
    """A logging handler on `obliviate.audit` that keeps the last `size` decisions in memory.

    The audit logger is set to INFO so the trail sees every decision whatever the log level;
    its records then reach the log's own handlers only when the configured level lets them,
    exactly as before the trail was installed.
    """

    def __init__(self, size: int = 500) -> None:
        super().__init__(logging.INFO)
        self._entries: deque[AuditRecord] = deque(maxlen=size)
        self._saved: tuple[int, bool] | None = None
        self._forward_level = logging.INFO

    def install(self) -> None:
        log = logging.getLogger(AUDIT_LOGGER)
        self._saved = (log.level, log.propagate)
        self._forward_level = log.getEffectiveLevel()
        log.setLevel(logging.INFO)
        log.propagate = False
        log.addHandler(self)

    def remove(self) -> None:
        log = logging.getLogger(AUDIT_LOGGER)
        log.removeHandler(self)
        if self._saved is not None:
            log.setLevel(self._saved[0])
            log.propagate = self._saved[1]
            self._saved = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields = parse_audit(record.getMessage())
            if fields is not None:
                positions = fields.get("positions")
                self._entries.append(
                    AuditRecord(
                        time=record.created,
                        request_id=fields["request_id"],
                        target_id=fields["target_id"],
                        action=fields["action"],
                        score=_number(fields.get("score")),
                        threshold=_number(fields.get("threshold")),
                        positions=int(positions) if positions and positions.isdigit() else None,
                    )
                )
        except Exception:
            self.handleError(record)
        if record.levelno >= self._forward_level:
            self._forward(record)

    def _forward(self, record: logging.LogRecord) -> None:
        """What propagation would have done: the ancestors' handlers, level by level."""
        parent = logging.getLogger(AUDIT_LOGGER).parent
        while parent is not None:
            for handler in parent.handlers:
                if record.levelno >= handler.level:
                    handler.handle(record)
            if not parent.propagate:
                break
            parent = parent.parent

    def entries(self, limit: int = 100) -> list[AuditRecord]:
        """The newest entries first."""
        return list(reversed(self._entries))[:limit]


def as_datetime(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def describe_activity(recorder: ActivityRecorder, names: Mapping[str, str]) -> ActivityResponse:
    """The recorder's buckets and totals, targets named (`names`: id -> name)."""
    buckets = recorder.buckets()
    totals = recorder.read()
    by_target: dict[str, dict[str, int]] = {}
    for (target, action), value in totals.items():
        if target != PASSED:
            by_target.setdefault(target, {})[action] = int(value)
    for target_id in names:
        by_target.setdefault(target_id, {})
    targets = [
        TargetActivity(
            target_id=target_id,
            name=names.get(target_id),
            flagged=sum(actions.values()),
            by_action=actions,
        )
        for target_id, actions in by_target.items()
    ]
    targets.sort(key=lambda t: (t.name is None, (t.name or t.target_id).lower()))
    return ActivityResponse(
        since=as_datetime(recorder.since),
        bucket_seconds=recorder.bucket_s,
        passed=int(sum(v for (t, _), v in totals.items() if t == PASSED)),
        targets=targets,
        series=[
            ActivityPoint(
                start=as_datetime(b.start),
                end=as_datetime(b.end),
                passed=b.passed,
                flagged=b.flagged,
            )
            for b in buckets
        ],
    )


def describe_audit(trail: AuditTrail, names: Mapping[str, str], limit: int = 100) -> AuditList:
    """The newest audit entries, targets named."""
    return AuditList(
        data=[
            AuditEntry(
                time=as_datetime(e.time),
                request_id=e.request_id,
                target_id=e.target_id,
                target=names.get(e.target_id),
                action=e.action,
                score=e.score,
                threshold=e.threshold,
                positions=e.positions,
            )
            for e in trail.entries(limit)
        ]
    )
