"""Where the guard reads a request: the static stage on the event loop, batched, for short
prompts it settles; the guard's thread for the rest, and whenever the loop path fails."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from classifier import Decision
from server.metrics import Metrics
from server.services.guard import ActiveTarget, EcoGuard


@dataclass
class SplitBank:
    """Settles texts without "gate" on the static stage; flags texts with "harry"."""

    name: str = "harry"
    fail_static: bool = False
    settled_batches: list[list[tuple[str, ...]]] = field(default_factory=list)
    full_batches: list[tuple[list[tuple[str, ...]], str]] = field(default_factory=list)

    def set_targets(self, targets: Iterable[Any]) -> None:
        pass

    def _decide(self, group: Sequence[str]) -> list[Decision]:
        flagged = any(self.name in t for t in group)
        return [Decision(self.name, 0.9, 0.5, True, "full")] if flagged else []

    def settled_groups(self, groups: Sequence[Sequence[str]]) -> list[list[Decision] | None]:
        self.settled_batches.append([tuple(g) for g in groups])
        if self.fail_static:
            raise RuntimeError("static stage broke")
        return [None if any("gate" in t for t in g) else self._decide(g) for g in groups]

    def classify_groups(
        self, groups: Sequence[Sequence[str]], *, only_flagged: bool = False
    ) -> list[list[Decision]]:
        self.full_batches.append(([tuple(g) for g in groups], threading.current_thread().name))
        return [self._decide(g) for g in groups]


@dataclass(frozen=True)
class StubClassifier:
    name: str


def guard(
    bank: SplitBank, loop_chars: int = 2000, loop_batch: int = 8, loop_batch_chars: int = 16000
) -> tuple[EcoGuard, Metrics]:
    metrics = Metrics()
    eco = EcoGuard(
        bank,  # type: ignore[arg-type]
        None,
        metrics,
        loop_chars=loop_chars,
        loop_batch=loop_batch,
        loop_batch_chars=loop_batch_chars,
    )
    target = ActiveTarget("id", bank.name, (), None, StubClassifier(bank.name))  # type: ignore[arg-type]
    eco.set_targets([target])
    return eco, metrics


def reads(metrics: Metrics, path: str) -> float:
    value = metrics.registry.get_sample_value("obliviate_guard_reads_total", {"path": path})
    return value or 0.0


async def test_short_prompts_of_one_pass_are_settled_together_on_the_loop() -> None:
    bank = SplitBank()
    eco, metrics = guard(bank)
    got = await asyncio.gather(
        eco.flagged(["what is rain?"]), eco.flagged(["who is harry?"]), eco.flagged(["hi"])
    )
    assert [[d.target for d in g] for g in got] == [[], ["harry"], []]
    assert bank.settled_batches == [[("what is rain?",), ("who is harry?",), ("hi",)]]
    assert bank.full_batches == []
    assert (reads(metrics, "loop"), reads(metrics, "thread")) == (3, 0)


async def test_loop_batch_bounds_what_one_pass_reads_at_once() -> None:
    bank = SplitBank()
    eco, _ = guard(bank, loop_batch=2)
    got = await asyncio.gather(*(eco.flagged([f"question {i}"]) for i in range(5)))
    assert got == [[]] * 5
    assert [len(b) for b in bank.settled_batches] == [2, 2, 1]


async def test_loop_batch_chars_bounds_the_characters_one_read_takes() -> None:
    bank = SplitBank()
    eco, _ = guard(bank, loop_chars=100, loop_batch=32, loop_batch_chars=100)
    # 40 + 40 + 40 characters reach 100 at the third request: it is the batch's last.
    texts = [["a" * 40], ["b" * 40], ["c" * 20, "c" * 20], ["d" * 90], ["e" * 5]]
    got = await asyncio.gather(*(eco.flagged(t) for t in texts))
    assert got == [[]] * 5
    assert [[sum(map(len, g)) for g in b] for b in bank.settled_batches] == [[40, 40, 40], [90, 5]]


async def test_what_the_static_stage_leaves_and_long_prompts_go_to_the_guard_thread() -> None:
    bank = SplitBank()
    eco, metrics = guard(bank, loop_chars=100)
    got = await asyncio.gather(
        eco.flagged(["harry passes the gate"]), eco.flagged(["harry " + "x" * 100])
    )
    assert [[d.target for d in g] for g in got] == [["harry"], ["harry"]]
    # Only the short one was tried on the loop; both were read on the guard's thread.
    assert bank.settled_batches == [[("harry passes the gate",)]]
    assert sorted(g for batch, _ in bank.full_batches for g in batch) == [
        ("harry passes the gate",), ("harry " + "x" * 100,)
    ]  # fmt: skip
    assert {thread for _, thread in bank.full_batches} == {"obliviate-guard"}
    assert (reads(metrics, "loop"), reads(metrics, "thread")) == (0, 2)


async def test_a_failure_on_the_loop_is_read_again_on_the_thread_never_passed(caplog) -> None:
    bank = SplitBank(fail_static=True)
    eco, metrics = guard(bank)
    got = await eco.flagged(["tell me about harry"])
    assert [d.target for d in got] == ["harry"]  # still flagged
    assert "Static stage failed on the loop" in caplog.text
    assert (reads(metrics, "loop"), reads(metrics, "thread")) == (0, 1)


async def test_loop_chars_zero_reads_everything_on_the_thread() -> None:
    bank = SplitBank()
    eco, metrics = guard(bank, loop_chars=0)
    assert [d.target for d in await eco.flagged(["harry"])] == ["harry"]
    assert bank.settled_batches == []
    assert (reads(metrics, "loop"), reads(metrics, "thread")) == (0, 1)


async def test_passed_requests_are_counted_per_tenant() -> None:
    from server.engine import ChatPrompt
    from server.services.tenancy import Caller

    eco, metrics = guard(SplitBank())

    def passes(tenant: str) -> float:
        labels = {"target": "none", "action": "pass", "tenant": tenant}
        return metrics.registry.get_sample_value("obliviate_guard_decisions_total", labels) or 0

    for tenant, text in [("team-a", "rain"), ("team-b", "snow"), ("team-a", "sun")]:
        prompt = ChatPrompt([{"role": "user", "content": text}])
        await eco.protect(prompt, "r", Caller("d", tenant))
    await eco.protect(ChatPrompt([{"role": "user", "content": "hail"}]), "r")
    await eco.protect(
        ChatPrompt([{"role": "user", "content": "harry"}]), "r", Caller("d", "team-b")
    )
    assert (passes("team-a"), passes("team-b"), passes("-")) == (2, 1, 1)
