"""The ECO guard: classify every prompt; corrupt the embeddings of flagged ones.

protect(prompt)
  ├─ texts = every turn (any role), tool calls and definitions, alone and joined, no template
  ├─ decisions = bank.settled_groups(...)    the static stage on the event loop, batched, for
  │    or bank.classify_groups(...)          short prompts no target's gate passes; else two
  │                                          stages (static embeddings, then MiniLM), batched
  │                                          on the guard's thread. A prompt naming an alias
  │                                          in full is always flagged
  ├─ nothing flagged ──> the prompt, untouched (token ids; byte-identical output)
  └─ flagged         ──> PromptCorruptor (server.services.corruptor): every flagged ECO
                          target's tokens corrupted with its own spec ──> PromptEmbeds
  δ targets (mode delta / eco+delta) add their offset models to the request: scope `all` on every
  request, scope `flagged` only when the classifier flags them (delta alone leaves the prompt as
  it is; the engine adds α·(small_unlearned − small_base) to the logits).
What the model then writes is watched by the output guard (server.services.output_guard).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

from classifier import ClassifierBank, Decision, TargetClassifier, conversation_pieces
from corruption import CorruptionSpec
from offset import DeltaSpec
from server.engine import ChatPrompt, TextPrompt, TokenPrompt
from server.engine.base import Prompt
from server.errors import InvalidRequestError, UnavailableError
from server.metrics import Metrics
from server.services.batching import BatchingExecutor, LoopBatcher
from server.services.corruptor import CorruptionTarget, PromptCorruptor
from server.services.tenancy import Caller, TenantScope

logger = logging.getLogger(__name__)
audit = logging.getLogger("obliviate.audit")
T = TypeVar("T")


@dataclass(frozen=True)
class ActiveTarget:
    """What the guard needs of a registered target."""

    id: str
    name: str
    aliases: tuple[str, ...]
    corruption: CorruptionSpec | None
    """None: the target does not corrupt prompts (mode delta)."""
    classifier: TargetClassifier
    offset: DeltaSpec | None = None
    """The target's δ offset (modes delta and eco+delta)."""
    scope: str = "flagged"
    """Which requests get the offset: `flagged` ones or `all`."""
    tenants: TenantScope = TenantScope()
    """Which callers the target applies to (default: all traffic)."""

    def corruption_target(self, default: CorruptionSpec) -> CorruptionTarget:
        """This target for the corruptor (δ-only targets corrupt with `default` when the
        output guard needs them corrupted)."""
        return CorruptionTarget(self.name, self.aliases, self.corruption or default)


@dataclass(frozen=True)
class Guarded:
    """What the engine gets: the prompt (untouched or corrupted) and the δ offsets in scope."""

    prompt: Prompt
    offsets: tuple[DeltaSpec, ...] = ()
    flagged: tuple[str, ...] = ()
    """Names of the targets the prompt was flagged for."""


PromptIn = ChatPrompt | TextPrompt | TokenPrompt


@dataclass(frozen=True)
class _Scope:
    """The targets that apply to a request, and what `protect` needs of them as a set."""

    targets: Mapping[str, ActiveTarget]
    always: tuple[DeltaSpec, ...]
    """The offsets of targets with scope `all`: added to every request."""
    classify: bool
    """Whether any target depends on the classifier (not every one is δ with scope `all`)."""
    everyone: bool
    """Whether every target applies to every caller (then this is every request's scope)."""

    @staticmethod
    def of(targets: Mapping[str, ActiveTarget]) -> _Scope:
        always = tuple(
            t.offset for t in targets.values() if t.offset is not None and t.scope == "all"
        )
        classify = any(t.offset is None or t.scope != "all" for t in targets.values())
        everyone = all(t.tenants.everyone for t in targets.values())
        return _Scope(targets, always, classify, everyone)


class EcoGuard:
    """`PromptGuard` that flags prompts about active targets and corrupts them (ECO)."""

    def __init__(
        self,
        bank: ClassifierBank,
        corruptor: PromptCorruptor | None,
        metrics: Metrics,
        *,
        log_prompts: bool = False,
        threads: int = 2,
        loop_chars: int = 2000,
        loop_batch: int = 32,
        loop_batch_chars: int = 16000,
    ) -> None:
        self._bank = bank
        self._loop_chars = loop_chars
        # Short prompts: the static stage on the event loop, batched with the requests handled
        # in the same pass (server.services.batching.LoopBatcher); no thread hand-off;
        # `loop_batch` requests (and `loop_batch_chars` characters) at a time, whose callers go
        # on before the next batch is read.
        self._settle: LoopBatcher[tuple[str, ...], list[Decision] | None] = LoopBatcher(
            lambda groups: self._bank.settled_groups(groups),
            max_batch=loop_batch,
            max_size=loop_batch_chars,
        )
        # A thread of its own, not asyncio's pool shared with registry calls and registration
        # jobs; requests waiting together are classified in one call (server.services.batching).
        # One item is one request's texts (joined, then each turn alone); its result, the
        # decisions of the targets it is flagged for (all the guard acts on).
        self._classifier: BatchingExecutor[tuple[str, ...], list[Decision]] = BatchingExecutor(
            lambda groups: self._bank.classify_groups(groups, only_flagged=True),
            name="obliviate-guard",
        )
        self._corruptor = corruptor
        self._metrics = metrics
        self._log_prompts = log_prompts
        # The active targets and what protect needs of them, computed once per set of targets
        # (not per request), swapped in one assignment.
        self._scope = _Scope.of({})
        self._reads = {path: metrics.guard_reads.labels(path) for path in ("loop", "thread")}
        # The pass counter of each tenant seen (as many as the metric has label sets): a
        # `labels` call costs a lock and a key check on every request.
        self._passes: dict[str, Any] = {}
        # The guard's own threads for corruption: never queued behind unrelated to_thread calls.
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="guard")

    @property
    def bank(self) -> ClassifierBank:
        return self._bank

    @property
    def corruptor(self) -> PromptCorruptor | None:
        return self._corruptor

    @property
    def active(self) -> Mapping[str, ActiveTarget]:
        """Active targets by name."""
        return self._scope.targets

    def in_scope(self, caller: Caller | None) -> Mapping[str, ActiveTarget]:
        """The active targets that apply to `caller` (tenant scoping)."""
        return self._scope_of(caller).targets

    def _scope_of(self, caller: Caller | None) -> _Scope:
        scope = self._scope
        if scope.everyone:
            return scope
        targets = scope.targets
        return _Scope.of({n: t for n, t in targets.items() if t.tenants.applies_to(caller)})

    def set_targets(self, targets: Sequence[ActiveTarget]) -> None:
        """Swap the whole active set at once; requests in flight keep the set they started with."""
        by_name = {t.name: t for t in targets}
        # Map first, bank second: a decision always finds its target (extra entries are harmless).
        self._scope = _Scope.of({**self._scope.targets, **by_name})
        self._bank.set_targets(t.classifier for t in targets)
        self._scope = _Scope.of(by_name)

    async def run(self, fn: Any, *args: Any) -> Any:
        """Run guard work (classifier, corruption) on the guard's own threads."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, partial(fn, *args))

    def texts(self, prompt: PromptIn) -> list[str]:
        """What the classifier reads: every text joined, then each text alone (no template)."""
        if isinstance(prompt, ChatPrompt):
            joined, pieces = conversation_pieces(
                list(prompt.messages), list(prompt.tools or ()), prompt.template_kwargs
            )
            return [joined, *(p.text for p in pieces)] if len(pieces) > 1 else [joined]
        if isinstance(prompt, TextPrompt):
            return [prompt.text]
        if self._corruptor is None:
            # Without the model's tokenizer token ids cannot be read, so they cannot be checked.
            raise InvalidRequestError(
                "Token-id prompts cannot be checked against the forget targets without a local "
                "copy of the model (--model PATH); send text instead.",
                param="prompt",
            )
        return [self._corruptor.decode(prompt.token_ids)]

    def prompt_text(self, prompt: PromptIn) -> str:
        """The joined text the classifier reads (shown by the dry run)."""
        return self.texts(prompt)[0]

    async def classify(self, texts: Sequence[str]) -> list[Decision]:
        """Every active target's decision on texts read together (flagged on any of them)."""
        if not self._scope.targets:
            return []
        decisions: list[Decision] = await self.run(self._bank.classify_all, list(texts))
        return decisions

    async def flagged(self, texts: Sequence[str]) -> list[Decision]:
        """The decisions of the targets flagged on texts read together (as `classify`, less
        the others), batched with the other requests waiting.

        Texts of up to `loop_chars` characters in all go first to the static stage on the
        event loop (`ClassifierBank.settled_groups`: the same Decisions when no target's gate
        passes): on the guard's thread, a batch waits for the GIL each time NumPy or the
        tokenizer lets go of it while the loop is busy (bench/gil_contention.py). Under a
        32-request burst at 20 targets the guard's own p50 is 9-15 ms this way (17-20 ms on
        the thread) and it adds 2.8-7.5 ms to admission p50 (bench/guard_cost.py, 27 runs;
        2.8-5.7 ms on a quiet machine).
        What the static stage leaves to MiniLM, longer texts, and any failure of the loop path
        go to the guard's thread, batched."""
        if not self._scope.targets:
            return []
        item = tuple(texts)
        chars = sum(map(len, item))
        if chars <= self._loop_chars:
            try:
                settled = await self._settle.submit(item, chars)
            except Exception:
                logger.exception("Static stage failed on the loop; reading on the guard thread")
                settled = None
            if settled is not None:
                self._reads["loop"].inc()
                return settled
        self._reads["thread"].inc()
        return await self._classifier.submit(item)

    async def protect(
        self, prompt: PromptIn, request_id: str, caller: Caller | None = None
    ) -> Guarded:
        """The prompt, untouched or with every flagged ECO target corrupted, and the δ offsets
        in scope (only targets whose tenant scope includes `caller` apply)."""
        scope = self._scope_of(caller)
        targets = scope.targets
        tenant = caller.label if caller else "-"
        if not targets:
            return Guarded(prompt)
        if not scope.classify:
            return Guarded(prompt, scope.always)  # nothing depends on the classifier
        start = time.perf_counter()
        decisions = await self.flagged(self.texts(prompt))
        flagged = [targets[d.target] for d in decisions if d.target in targets]
        self._metrics.guard_seconds.observe(time.perf_counter() - start)
        if not flagged:
            passes = self._passes.get(tenant)
            if passes is None:
                passes = self._metrics.decisions.labels("none", "pass", tenant)
                self._passes[tenant] = passes
            passes.inc()
            return Guarded(prompt, scope.always)
        by_name = {d.target: d for d in decisions}
        names = tuple(t.name for t in flagged)
        scoped = [t.offset for t in flagged if t.offset is not None and t.scope == "flagged"]
        offsets = tuple(dict.fromkeys((*scope.always, *scoped)))
        eco = [t for t in flagged if t.corruption is not None]
        if not eco:
            for t in flagged:
                self._metrics.decisions.labels(t.id, "delta", tenant).inc()
                self._audit(request_id, t, by_name[t.name], prompt, "delta", None, caller)
            return Guarded(prompt, offsets, names)
        corrupted, positions = await self.corrupt(prompt, eco)
        for t in flagged:
            action = "corrupt" if t.corruption is not None else "delta"
            self._metrics.decisions.labels(t.id, action, tenant).inc()
            self._audit(request_id, t, by_name[t.name], prompt, action, positions, caller)
        return Guarded(corrupted, offsets, names)

    async def corrupt(self, prompt: Any, targets: Sequence[ActiveTarget]) -> tuple[Any, int]:
        """Corrupt `targets`' tokens in `prompt` (a prompt or a TemplatedPrompt)."""
        if self._corruptor is None:
            raise UnavailableError(
                "This request concerns a protected topic and the gateway has no local copy of "
                "the model's embeddings to protect it; it was not sent."
            )
        default = self._corruptor.default_spec()
        plan = [t.corruption_target(default) for t in targets]
        result: tuple[Any, int] = await self.run(self._corruptor.corrupt, prompt, plan)
        return result

    def _audit(
        self,
        request_id: str,
        target: ActiveTarget,
        decision: Decision,
        prompt: PromptIn,
        action: str,
        positions: int | None,
        caller: Caller | None = None,
    ) -> None:
        audit.info(
            "flagged request_id=%s tenant=%s user=%r target_id=%s action=%s stage=%s "
            "score=%.4f threshold=%.4f positions=%s%s",
            request_id,
            caller.label if caller else "-",
            caller.end_user if caller else None,
            target.id,
            action,
            decision.stage,
            decision.score,
            decision.threshold,
            positions,
            f" prompt={self.prompt_text(prompt)!r}" if self._log_prompts else "",
        )
