"""Log-probabilities of given answers under the model a mode serves.

`GatewayScorer` asks the gateway itself (the answer as a continued assistant turn, the engine's
prompt logprobs: what the engine read, the guard's corruption included; the ECO paper's protocol,
where the answer's target mentions are corrupted too). `AnswerScorer` computes them with
transformers from the same weights and the same prompt the engine receives:
- plain modes (none, prompt, snap, reference): the served folder, the templated chat prompt;
- eco: the target model fed the prompt embeddings the gateway would send (flag decision from
  the gateway's /admin/classify, corruption by the gateway's own `PromptCorruptor` with the
  target's calibrated spec, whose noise is seeded, so the embeddings are the same);
- delta: logits = big + α·(small_unlearned − small_base) at every answer position; at scope
  `flagged` (delta+npo) only after prompts the gateway flags (`FlaggedScorer`), the plain target
  after the others, as the engine serves them.
The scoring itself is `corruption.likelihood` (the strength search's scorer too).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from corruption.likelihood import next_token_logprobs, token_logprobs
from server.engine.base import ChatPrompt
from server.engine.templating import render_prompt
from server.protocol.common import ChatMessageParam

Messages = list[ChatMessageParam]
PromptEmbedder = Callable[[Messages], torch.Tensor | None]
"""Messages -> the (T, H) prompt embeddings the engine receives, or None for the token ids."""


@dataclass(frozen=True)
class ScoreItem:
    messages: Messages
    answer: str


class Scorer(Protocol):
    def mean_logprobs(self, items: Sequence[ScoreItem]) -> list[float]:
        """Per-token mean log-probability of each answer."""


class GatewayScorer:
    """Answer log-probabilities through the gateway (`Gateway.answer_logprobs`), in parallel."""

    def __init__(self, gateway: Any) -> None:
        self._gateway = gateway

    def token_logprobs(self, items: Sequence[ScoreItem]) -> list[list[float]]:
        """Log-probability of every answer token, per item."""
        gw = self._gateway
        return list(gw.map(lambda it: gw.answer_logprobs(list(it.messages), it.answer), items))

    def mean_logprobs(self, items: Sequence[ScoreItem]) -> list[float]:
        """Per-token mean log-probability of each answer."""
        return [sum(lp) / len(lp) for lp in self.token_logprobs(items)]


def load_model(folder: Path) -> Any:
    """A float32 causal LM in eval mode (scoring compares with a bf16/fp32 engine)."""
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, local_files_only=True
    )
    return model.eval()


class AnswerScorer:
    """Per-token log-probabilities of answers under Σ_i w_i · logits_i(x) (one term: a model)."""

    def __init__(
        self,
        tokenizer: Any,
        terms: Sequence[tuple[Any, float]],
        *,
        prompt_embedder: PromptEmbedder | None = None,
        batch_size: int = 16,
        cache: dict[tuple[str, str, str], float] | None = None,
        weights_key: str | None = None,
    ) -> None:
        if not terms:
            raise ValueError("at least one model")
        self._tokenizer = tokenizer
        self._terms = list(terms)
        self._embedder = prompt_embedder
        self._batch_size = batch_size
        # Modes that serve the same weights share the scores of prompts they send unchanged
        # (eco's unflagged prompts, delta at α = 1 vs snap): mean log-probs by (weights, prompt,
        # answer). Prompts sent as corrupted embeddings are never shared.
        self._cache = cache if cache is not None and weights_key is not None else None
        self._weights_key = weights_key or ""

    def _prompt(self, messages: Messages) -> torch.Tensor:
        """The prompt the engine receives: its (T, H) embeddings when the embedder sends
        embeddings (a corrupted prompt), else its token ids (T,)."""
        prompt_ids = render_prompt(self._tokenizer, ChatPrompt(list(messages))).token_ids
        embeds = self._embedder(messages) if self._embedder is not None else None
        if embeds is None:
            return torch.tensor(prompt_ids)
        if embeds.shape[0] != len(prompt_ids):
            raise ValueError("prompt embeddings and token ids disagree on the prompt length")
        return embeds

    def next_token_top(self, messages: Messages, k: int = 20) -> dict[str, float]:
        """Top-k log-probabilities of the reply's first token under Σ_i w_i · logits_i.

        For δ modes, whose logprobs the gateway refuses (vLLM takes them before the offset).
        """
        logprobs = next_token_logprobs(self._terms, [self._prompt(messages)])[0]  # (V,)
        top = torch.topk(logprobs, k)
        out: dict[str, float] = {}
        for lp, token_id in zip(top.values.tolist(), top.indices.tolist(), strict=True):
            token = self._tokenizer.decode([token_id])
            out[token] = max(lp, out.get(token, float("-inf")))
        return out

    def token_logprobs(self, items: Sequence[ScoreItem]) -> list[list[float]]:
        """Log-probability of every answer token, per item (same order as `items`).

        Items with the same prompt share one prompt pass: its KV cache is repeated for their
        answers (TOFU scores 7 answers per question, so this halves the tokens computed).
        """
        groups: dict[str, list[int]] = {}
        for i, it in enumerate(items):
            groups.setdefault(json.dumps(it.messages), []).append(i)
        prompts = [self._prompt(items[members[0]].messages) for members in groups.values()]
        order = [i for members in groups.values() for i in members]
        owners = [g for g, members in enumerate(groups.values()) for _ in members]
        answers = [self._encode_answer(items[i].answer) for i in order]
        scores = token_logprobs(self._terms, prompts, answers, owners, batch_size=self._batch_size)
        out: list[list[float]] = [[] for _ in items]
        for i, lps in zip(order, scores, strict=True):
            out[i] = lps
        return out

    def _encode_answer(self, answer: str) -> list[int]:
        ids: list[int] = self._tokenizer(answer, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError("an answer has at least one token")
        return ids

    def mean_logprobs(self, items: Sequence[ScoreItem]) -> list[float]:
        """Per-token mean log-probability of each answer."""
        if self._cache is None:
            return [sum(lp) / len(lp) for lp in self.token_logprobs(items)]
        cache = self._cache
        keys = [(self._weights_key, json.dumps(it.messages), it.answer) for it in items]
        sendable = [self._embedder is None or self._embedder(it.messages) is None for it in items]
        todo = [i for i, k in enumerate(keys) if not (sendable[i] and k in cache)]
        fresh = self.token_logprobs([items[i] for i in todo])
        out: dict[int, float] = {i: sum(lp) / len(lp) for i, lp in zip(todo, fresh, strict=True)}
        for i in todo:
            if sendable[i]:
                cache[keys[i]] = out[i]
        return [out[i] if i in out else cache[keys[i]] for i in range(len(items))]


class FlaggedScorer:
    """A mode the gateway applies to flagged prompts only (δ at scope `flagged`): answers after a
    prompt `flagged` says the guard flags are scored by `on_flagged`, the others by `plain`."""

    def __init__(
        self, flagged: Callable[[Messages], bool], on_flagged: AnswerScorer, plain: AnswerScorer
    ) -> None:
        self._flagged = flagged
        self._on_flagged = on_flagged
        self._plain = plain

    def mean_logprobs(self, items: Sequence[ScoreItem]) -> list[float]:
        """Per-token mean log-probability of each answer, each under its prompt's scorer."""
        marks = [self._flagged(it.messages) for it in items]
        out = [0.0] * len(items)
        for scorer, mark in ((self._on_flagged, True), (self._plain, False)):
            rows = [i for i, m in enumerate(marks) if m == mark]
            if rows:
                scores = scorer.mean_logprobs([items[i] for i in rows])
                for i, value in zip(rows, scores, strict=True):
                    out[i] = value
        return out
