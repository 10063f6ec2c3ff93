"""The ECO guard: classify every prompt; corrupt the embeddings of flagged ones.

protect(prompt)
  ├─ text = user + system turns, all of them, no template  (classifier.conversation_text)
  ├─ decisions = bank.classify(text)     two stages: static embeddings, then MiniLM
  ├─ nothing flagged ──> the prompt, untouched (token ids; byte-identical output)
  └─ flagged for T   ──> PromptCorruptor: template, select T's spans (else the user text),
                          corrupt those embeddings with T's CorruptionSpec ──> PromptEmbeds
  δ targets (mode delta / eco+delta) add their offset models to the request: scope `all` on every
  request, scope `flagged` only when the classifier flags them (delta alone leaves the prompt as
  it is; the engine adds α·(small_unlearned − small_base) to the logits).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from classifier import ClassifierBank, Decision, TargetClassifier, conversation_text
from corruption import CorruptionSpec, EmbeddingTable, apply_corruption, tokenize_prompt
from offset import DeltaSpec
from server.engine import ChatPrompt, PromptEmbeds, TextPrompt, TokenPrompt
from server.engine.base import Prompt
from server.engine.templating import render_prompt
from server.errors import InvalidRequestError, UnavailableError
from server.metrics import Metrics
from server.services.batching import BatchingExecutor

logger = logging.getLogger(__name__)
audit = logging.getLogger("obliviate.audit")


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


@dataclass(frozen=True)
class Guarded:
    """What the engine gets: the prompt (untouched or corrupted) and the δ offsets in scope."""

    prompt: Prompt
    offsets: tuple[DeltaSpec, ...] = ()


class PromptCorruptor:
    """Templated prompt -> (T, H) embeddings with the selected positions corrupted."""

    def __init__(self, tokenizer: Any, table: EmbeddingTable) -> None:
        self._tokenizer = tokenizer
        self._table = table

    def default_spec(self) -> CorruptionSpec:
        """Uncalibrated default: noise of ~4x the embedding table's std on the target's tokens."""
        return CorruptionSpec.recommended(self._table.std)

    def decode(self, token_ids: Sequence[int]) -> str:
        """Token ids -> text, for classifying token prompts."""
        return str(self._tokenizer.decode(list(token_ids)))

    def corrupt(
        self,
        prompt: ChatPrompt | TextPrompt | TokenPrompt,
        spans: Sequence[str],
        spec: CorruptionSpec,
    ) -> tuple[PromptEmbeds, int]:
        """Corrupt the tokens naming the target (`spans` are alias strings), else all user text.

        Returns the prompt embeddings and how many positions were corrupted.
        """
        from classifier import find_spans

        if isinstance(prompt, TokenPrompt):
            prompt = TextPrompt(self.decode(prompt.token_ids))
        text = render_prompt(self._tokenizer, prompt).text
        # Completions prompts get the tokenizer's special tokens, chat prompts have them inline.
        special = isinstance(prompt, TextPrompt)
        tokens = tokenize_prompt(self._tokenizer, text, add_special_tokens=special)
        named = find_spans(text, list(spans)) if spans else []
        mask = tokens.mask(named, fallback=_user_ranges(prompt, text))  # (T,)
        with torch.inference_mode():
            embeds = self._table.lookup(tokens.ids)  # (T, H)
            corrupted = apply_corruption(embeds, mask, spec)  # (T, H)
        return PromptEmbeds(embeds=corrupted, token_ids=tokens.ids), int(mask.sum())


def _user_ranges(prompt: ChatPrompt | TextPrompt, text: str) -> list[tuple[int, int]]:
    """Character ranges of the user turns' content inside the templated text."""
    if isinstance(prompt, TextPrompt):
        return [(0, len(text))]
    ranges, cursor = [], 0
    for message in prompt.messages:
        content = message["content"]
        at = text.find(content, cursor) if content else -1
        if at < 0:
            continue
        cursor = at + len(content)
        if message["role"] == "user":
            ranges.append((at, cursor))
    return ranges


class EcoGuard:
    """`PromptGuard` that flags prompts about active targets and corrupts them (ECO)."""

    def __init__(
        self,
        bank: ClassifierBank,
        corruptor: PromptCorruptor | None,
        metrics: Metrics,
        *,
        log_prompts: bool = False,
    ) -> None:
        self._bank = bank
        # A thread of its own, not asyncio's pool shared with registry calls and registration
        # jobs; requests waiting together are classified in one call (server.services.batching).
        self._classifier: BatchingExecutor[str, list[Decision]] = BatchingExecutor(
            lambda texts: self._bank.classify(texts), name="obliviate-guard"
        )
        self._corruptor = corruptor
        self._metrics = metrics
        self._log_prompts = log_prompts
        self._targets: Mapping[str, ActiveTarget] = {}

    @property
    def bank(self) -> ClassifierBank:
        return self._bank

    @property
    def corruptor(self) -> PromptCorruptor | None:
        return self._corruptor

    @property
    def active(self) -> Mapping[str, ActiveTarget]:
        """Active targets by name."""
        return self._targets

    def set_targets(self, targets: Sequence[ActiveTarget]) -> None:
        """Swap the whole active set at once; requests in flight keep the set they started with."""
        by_name = {t.name: t for t in targets}
        # Map first, bank second: a decision always finds its target (extra entries are harmless).
        self._targets = {**self._targets, **by_name}
        self._bank.set_targets(t.classifier for t in targets)
        self._targets = by_name

    def prompt_text(self, prompt: ChatPrompt | TextPrompt | TokenPrompt) -> str:
        """The text the classifier sees (no template)."""
        if isinstance(prompt, ChatPrompt):
            return conversation_text(list(prompt.messages))
        if isinstance(prompt, TextPrompt):
            return prompt.text
        if self._corruptor is None:
            # Without the model's tokenizer token ids cannot be read, so they cannot be checked.
            raise InvalidRequestError(
                "Token-id prompts cannot be checked against the forget targets without a local "
                "copy of the model (--model PATH); send text instead.",
                param="prompt",
            )
        return self._corruptor.decode(prompt.token_ids)

    async def classify(self, text: str) -> list[Decision]:
        """Every active target's decision on `text`."""
        if not self._targets:
            return []
        return await self._classifier.submit(text)

    async def protect(
        self, prompt: ChatPrompt | TextPrompt | TokenPrompt, request_id: str
    ) -> Guarded:
        """The prompt, untouched or corrupted for the most confident flagged ECO target, and the
        δ offsets in scope."""
        targets = self._targets
        if not targets:
            return Guarded(prompt)
        always = [t.offset for t in targets.values() if t.offset is not None and t.scope == "all"]
        if all(t.offset is not None and t.scope == "all" for t in targets.values()):
            return Guarded(prompt, tuple(always))  # nothing depends on the classifier
        start = time.perf_counter()
        decisions = await self.classify(self.prompt_text(prompt))
        flagged = [d for d in decisions if d.flagged and d.target in targets]
        self._metrics.guard_seconds.observe(time.perf_counter() - start)
        if not flagged:
            self._metrics.decisions.labels("none", "pass").inc()
            return Guarded(prompt, tuple(always))
        offsets = always + [
            t.offset
            for t in (targets[d.target] for d in flagged)
            if t.offset is not None and t.scope == "flagged"
        ]
        eco = [d for d in flagged if targets[d.target].corruption is not None]
        if not eco:
            for d in flagged:
                self._metrics.decisions.labels(targets[d.target].id, "delta").inc()
            self._audit(request_id, max(flagged, key=lambda d: d.score), prompt, "delta", None)
            return Guarded(prompt, tuple(dict.fromkeys(offsets)))
        decision = max(eco, key=lambda d: d.score)
        target = targets[decision.target]
        assert target.corruption is not None
        if self._corruptor is None:
            raise UnavailableError(
                "This request concerns a protected topic and the gateway has no local copy of "
                "the model's embeddings to protect it; it was not sent."
            )
        corrupted, positions = await asyncio.to_thread(
            self._corruptor.corrupt, prompt, target.aliases, target.corruption
        )
        self._metrics.decisions.labels(target.id, "corrupt").inc()
        self._audit(request_id, decision, prompt, "corrupt", positions)
        return Guarded(corrupted, tuple(dict.fromkeys(offsets)))

    def _audit(
        self,
        request_id: str,
        decision: Decision,
        prompt: ChatPrompt | TextPrompt | TokenPrompt,
        action: str,
        positions: int | None,
    ) -> None:
        target = self._targets[decision.target]
        audit.info(
            "flagged request_id=%s target_id=%s action=%s score=%.4f threshold=%.4f positions=%s%s",
            request_id,
            target.id,
            action,
            decision.score,
            decision.threshold,
            positions,
            f" prompt={self.prompt_text(prompt)!r}" if self._log_prompts else "",
        )
