"""Flagged prompt -> (T, H) prompt embeddings with every flagged target's tokens corrupted.

corrupt(prompt, targets)
  ├─ template the prompt exactly as the engine will (server.engine.templating)
  ├─ for each flagged target: the tokens of its spans (aliases, typos, obfuscated forms) in every
  │   turn; a target flagged without any span in the text: the content of every turn
  ├─ the union of those masks, each target corrupted with its own spec (the strongest wins
  │   where two overlap)
  └─ no position selected at all is impossible: all content tokens, else every token
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from classifier import find_spans, message_texts, tool_strings
from corruption import CorruptionSpec, EmbeddingTable, apply_corruption, tokenize_prompt
from corruption.embeddings import PromptTokens, mask_for_ranges
from server.engine import ChatPrompt, PromptEmbeds, TextPrompt, TokenPrompt
from server.engine.templating import render_prompt
from server.errors import InvalidRequestError

Span = tuple[int, int]
SpanFinder = Callable[[str, Sequence[str]], Mapping[str, list[Span]]]
"""(text, target names) -> each target's character spans in the text."""
_DECODE_CONTEXT = 8  # generated ids before a delta that `token_texts` decodes it after


@dataclass(frozen=True)
class CorruptionTarget:
    """One flagged target as the corruptor needs it."""

    name: str
    aliases: tuple[str, ...]
    spec: CorruptionSpec


@dataclass(frozen=True)
class TemplatedPrompt:
    """The exact text the engine reads, how to tokenize it, and where the client's texts lie."""

    text: str
    special_tokens: bool
    """Tokenize with the tokenizer's own special tokens (completions) or none (chat: inline)."""
    content: tuple[Span, ...]
    """Character ranges of the client's texts inside `text` (every turn, any role)."""
    token_ids: tuple[int, ...] | None = None
    """Token-id prompts keep their ids: `text` is their decoding, token by token."""

    def extended(self, released: str) -> TemplatedPrompt:
        """This prompt followed by generated text (the output guard's continuation). The text
        is no content of the client's: only target spans inside it are corrupted."""
        return TemplatedPrompt(self.text + released, self.special_tokens, self.content)


def streamed_texts(
    tokenizer: Any,
    ids: Sequence[int],
    context: Sequence[int] = (),
    skip_special_tokens: bool = True,
) -> list[str] | None:
    """The text each of `ids` adds after the ids `context`, as vLLM's incremental detokenizer
    (tokenizers' `DecodeStream`) writes it; None without a fast tokenizer."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is None:
        return None
    from tokenizers.decoders import DecodeStream

    stream = DecodeStream(ids=list(context), skip_special_tokens=skip_special_tokens)
    return [stream.step(backend, int(i)) or "" for i in ids]


class PromptCorruptor:
    """Templates prompts, finds the flagged targets' tokens and corrupts their embeddings."""

    def __init__(
        self, tokenizer: Any, table: EmbeddingTable, span_finder: SpanFinder | None = None
    ) -> None:
        self._tokenizer = tokenizer
        self._table = table
        self._span_finder = span_finder
        self._special = frozenset(int(i) for i in getattr(tokenizer, "all_special_ids", ()))

    def default_spec(self) -> CorruptionSpec:
        """Uncalibrated default: noise of ~4x the embedding table's std on the target's tokens."""
        return CorruptionSpec.recommended(self._table.std)

    def decode(self, token_ids: Sequence[int]) -> str:
        """Token ids -> text, for classifying token prompts."""
        return str(self._tokenizer.decode(list(token_ids)))

    def token_texts(
        self, context: Sequence[int], ids: Sequence[int], *, skip_special_tokens: bool = True
    ) -> list[str] | None:
        """The text each of `ids` adds after the generated ids `context`, as vLLM's incremental
        detokenizer (tokenizers' `DecodeStream`) writes it; None without a fast tokenizer."""
        # The last few ids are enough context: a token's text depends on the ids since the last
        # complete character (a caller checks that the pieces join to the text it has).
        return streamed_texts(self._tokenizer, ids, context[-_DECODE_CONTEXT:], skip_special_tokens)

    def template(self, prompt: ChatPrompt | TextPrompt | TokenPrompt) -> TemplatedPrompt:
        """The prompt as the engine will read it, with the client's texts located in it."""
        if isinstance(prompt, TokenPrompt):
            ids = tuple(int(i) for i in prompt.token_ids)
            text = self.decode(ids)
            return TemplatedPrompt(text, False, ((0, len(text)),), ids)
        text = render_prompt(self._tokenizer, prompt).text
        if isinstance(prompt, TextPrompt):
            return TemplatedPrompt(text, True, ((0, len(text)),))
        return TemplatedPrompt(text, False, tuple(_content_ranges(prompt, text)))

    def corrupt(
        self,
        prompt: ChatPrompt | TextPrompt | TokenPrompt | TemplatedPrompt,
        targets: Sequence[CorruptionTarget],
        *,
        fallback: CorruptionSpec | None = None,
    ) -> tuple[PromptEmbeds, int]:
        """Corrupt every target's tokens (or, for a target not named in the text, all content
        tokens); no targets: all content tokens with `fallback` (the guard failed closed).

        Returns the prompt embeddings and how many positions were corrupted (never 0).
        """
        templated = prompt if isinstance(prompt, TemplatedPrompt) else self.template(prompt)
        tokens = self._tokens(templated)
        if not tokens.ids:
            raise InvalidRequestError("The prompt is empty", param="prompt")
        content = self._content_mask(tokens, templated.content)  # (T,)
        spans = self._spans(templated.text, targets)
        layers: list[tuple[CorruptionSpec, torch.Tensor]] = []
        for target in targets:
            named = mask_for_ranges(tokens.offsets, spans.get(target.name, []), exclude_last=False)
            layers.append((target.spec, named if bool(named.any()) else content))
        if not targets:
            layers.append((fallback or self.default_spec(), content))
        # The weakest first: where two targets' tokens overlap, the strongest spec is applied last.
        layers.sort(key=lambda layer: abs(layer[0].strength))
        with torch.inference_mode():
            clean = self._table.lookup(tokens.ids)  # (T, H)
            out = clean.clone()  # (T, H)
            selected = torch.zeros(len(tokens.ids), dtype=torch.bool)  # (T,)
            for spec, mask in layers:
                out[mask] = apply_corruption(clean, mask, spec)[mask]
                selected |= mask
        positions = int(selected.sum())
        if positions == 0:  # unreachable: _content_mask never returns an empty mask
            raise AssertionError("a flagged prompt would have reached the engine uncorrupted")
        ids = list(templated.token_ids) if templated.token_ids is not None else tokens.ids
        return PromptEmbeds(embeds=out, token_ids=ids), positions

    def token_ids(self, templated: TemplatedPrompt) -> list[int]:
        """The token ids the engine reads for a templated prompt."""
        return self._tokens(templated).ids

    def _tokens(self, templated: TemplatedPrompt) -> PromptTokens:
        if templated.token_ids is None:
            return tokenize_prompt(
                self._tokenizer, templated.text, add_special_tokens=templated.special_tokens
            )
        # Keep the client's ids; each token's characters come from decoding it alone.
        offsets, pos = [], 0
        for token_id in templated.token_ids:
            piece = self.decode([token_id])
            offsets.append((pos, pos + len(piece)))
            pos += len(piece)
        return PromptTokens(ids=list(templated.token_ids), offsets=offsets)

    def _content_mask(self, tokens: PromptTokens, content: Sequence[Span]) -> torch.Tensor:
        """Tokens of the client's texts; failing that every token but the template's special
        ones; failing that every token. Never empty for a non-empty prompt."""
        mask = mask_for_ranges(tokens.offsets, content, exclude_last=False)  # (T,)
        if not bool(mask.any()):
            mask = torch.tensor([i not in self._special for i in tokens.ids], dtype=torch.bool)
        if not bool(mask.any()):
            mask = torch.ones(len(tokens.ids), dtype=torch.bool)
        return mask

    def _spans(self, text: str, targets: Sequence[CorruptionTarget]) -> Mapping[str, list[Span]]:
        if not targets:
            return {}
        if self._span_finder is not None:
            found = dict(self._span_finder(text, [t.name for t in targets]))
        else:
            found = {}
        for t in targets:  # targets the finder does not know (yet): by their aliases
            if t.name not in found:
                found[t.name] = find_spans(text, list(t.aliases)) if t.aliases else []
        return found


def _content_ranges(prompt: ChatPrompt, text: str) -> list[Span]:
    """Where each text of each turn (any role) lies in the templated text, in order.

    Found by searching forward for each text as sent, then with its surrounding whitespace
    trimmed (templates that strip it); a text the template rewrote is not found and the caller
    falls back to every non-special token.
    """
    ranges: list[Span] = []
    for tool in prompt.tools or ():  # rendered where the template puts them (usually first)
        for piece in tool_strings(tool):
            at = text.find(piece) if len(piece) >= 8 else -1
            if at >= 0:
                ranges.append((at, at + len(piece)))
    cursor = 0
    for i, message in enumerate(prompt.messages):
        for _, piece in message_texts(message, f"messages[{i}]"):
            for candidate in (piece, piece.strip()):
                if not candidate:
                    continue
                at = text.find(candidate, cursor)
                if at >= 0:
                    ranges.append((at, at + len(candidate)))
                    cursor = at + len(candidate)
                    break
    return ranges
