"""Per-request size limits: prompt characters (and tokens for token-id prompts), max_tokens, n,
and the range of numeric fields an engine would choke on (seed, top_k, min_tokens, logit_bias,
repetition_penalty, token ids).

Each breach is a 400 `invalid_request_error` whose `param` names the field.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass

from server.errors import InvalidRequestError
from server.protocol.chat import ChatCompletionRequest, ChatMessage
from server.protocol.completion import CompletionRequest


@dataclass(frozen=True)
class RequestLimits:
    """Per-request size limits; each breach is a 400 naming the parameter."""

    max_prompt_chars: int = 100_000
    max_prompt_tokens: int | None = 32_768
    max_tokens: int = 4096
    max_n: int = 8

    def check_chat(self, req: ChatCompletionRequest) -> None:
        self.check_messages(req.messages)
        if req.tools:
            self._check_chars(_chars([t.model_dump() for t in req.tools]), "tools")
        self._check_tokens(req.max_completion_tokens, "max_completion_tokens")
        self._check_tokens(req.max_tokens, "max_tokens")
        self._check_n(req.n, "n")
        _check_numbers(req, self.max_tokens)

    def check_messages(self, messages: Sequence[ChatMessage]) -> None:
        """Every turn's text, tool calls and names count towards the prompt size."""
        chars = 0
        for m in messages:
            param = m.to_param()
            chars += len(param["content"])
            chars += _chars(param.get("tool_calls")) + len(param.get("name", ""))
        self._check_chars(chars, "messages")

    def check_text(self, text: str) -> None:
        self._check_chars(len(text), "prompt")

    def check_completion(self, req: CompletionRequest) -> None:
        prompt = req.prompt
        prompts: list[str | list[int]]
        if isinstance(prompt, str) or (prompt and all(isinstance(p, int) for p in prompt)):
            prompts = [prompt]  # type: ignore[list-item]
        else:
            prompts = list(prompt)  # type: ignore[arg-type]
        self._check_n(len(prompts), "prompt", what="prompts per request")
        for p in prompts:
            if isinstance(p, str):
                self._check_chars(len(p), "prompt")
            else:
                self._check_token_ids(p)
        self._check_tokens(req.max_tokens, "max_tokens")
        self._check_n(req.n, "n")
        _check_numbers(req, self.max_tokens)

    def _check_token_ids(self, ids: list[int]) -> None:
        # Before the ids are decoded and classified: their number and range.
        if self.max_prompt_tokens is not None and len(ids) > self.max_prompt_tokens:
            raise InvalidRequestError(
                f"The prompt has {len(ids)} tokens; this server accepts at most "
                f"{self.max_prompt_tokens}.",
                param="prompt",
                code="prompt_too_long",
            )
        if ids and not (0 <= min(ids) and max(ids) <= MAX_TOKEN_ID):
            raise InvalidRequestError(
                f"Token ids must be between 0 and {MAX_TOKEN_ID}.", param="prompt"
            )

    def _check_chars(self, chars: int, param: str) -> None:
        if chars > self.max_prompt_chars:
            raise InvalidRequestError(
                f"The prompt has {chars} characters; this server accepts at most "
                f"{self.max_prompt_chars}.",
                param=param,
                code="prompt_too_long",
            )

    def _check_tokens(self, value: int | None, param: str) -> None:
        if value is not None and value > self.max_tokens:
            raise InvalidRequestError(
                f"{param}={value} is above this server's limit of {self.max_tokens}.",
                param=param,
            )

    def _check_n(self, value: int | None, param: str, what: str = "choices") -> None:
        if value is not None and value > self.max_n:
            raise InvalidRequestError(
                f"{value} {what} asked for; this server allows at most {self.max_n}.",
                param=param,
            )


INT64 = (-(2**63), 2**63 - 1)
MAX_TOKEN_ID = 2**31 - 1
MAX_LOGIT_BIAS_ENTRIES = 300  # OpenAI's own limit
LOGIT_BIAS_RANGE = 100.0


def _check_numbers(req: ChatCompletionRequest | CompletionRequest, max_tokens: int) -> None:
    """Numeric fields whose type allows values no engine handles."""
    if req.seed is not None and not INT64[0] <= req.seed <= INT64[1]:
        raise InvalidRequestError("seed must fit in a signed 64-bit integer.", param="seed")
    if req.top_k is not None and req.top_k > MAX_TOKEN_ID:
        raise InvalidRequestError(f"top_k must be at most {MAX_TOKEN_ID}.", param="top_k")
    if req.repetition_penalty is not None and not math.isfinite(req.repetition_penalty):
        raise InvalidRequestError("repetition_penalty must be finite.", param="repetition_penalty")
    if req.min_tokens > max_tokens:
        raise InvalidRequestError(
            f"min_tokens={req.min_tokens} is above this server's limit of {max_tokens}.",
            param="min_tokens",
        )
    bias = req.logit_bias or {}
    if len(bias) > MAX_LOGIT_BIAS_ENTRIES:
        raise InvalidRequestError(
            f"logit_bias may name at most {MAX_LOGIT_BIAS_ENTRIES} tokens.", param="logit_bias"
        )
    for token, value in bias.items():
        if not (math.isfinite(value) and -LOGIT_BIAS_RANGE <= value <= LOGIT_BIAS_RANGE):
            raise InvalidRequestError(
                f"logit_bias values must be between -100 and 100 (token {token[:20]!r}).",
                param="logit_bias",
            )


def _chars(content: object) -> int:
    if content is None:
        return 0
    if isinstance(content, str):
        return len(content)
    return len(json.dumps(content, ensure_ascii=False))
