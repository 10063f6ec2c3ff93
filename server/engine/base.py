"""The seam between the guard and whatever generates tokens.

An `Engine` takes one `GenerationRequest` (one prompt, `n` samples) and yields `GenerationChunk`s:
deltas of every choice plus running token counts. The OpenAI response shapes are built by the
service, so the in-process vLLM engine, an upstream server and the test fake all speak the same
small language.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import torch

from offset.delta import DeltaSpec
from server.protocol.common import ChatMessageParam

FinishReason = Literal["stop", "length", "abort"]


@dataclass(frozen=True)
class SamplingOptions:
    """Sampling parameters as the client gave them; None means the engine's default."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    n: int = 1
    logprobs: int | None = None
    """Number of top alternatives per token; None: no logprobs at all."""
    logit_bias: dict[int, float] | None = None
    min_tokens: int = 0
    extra_args: dict[str, Any] | None = None
    """Engine-specific per-request arguments (vLLM `extra_args` / `vllm_xargs`)."""
    bad_words: tuple[str, ...] = ()
    """Words the engine must not generate (vLLM `bad_words`; the output guard's restarts)."""


@dataclass(frozen=True)
class PromptEmbeds:
    """A prompt given as input embeddings instead of token ids (a flagged ECO request).

    `embeds` is (T, H), one row per token of `token_ids`, the fully templated prompt.
    """

    embeds: torch.Tensor  # (T, H)
    token_ids: Sequence[int]


@dataclass(frozen=True)
class ChatPrompt:
    messages: Sequence[ChatMessageParam]
    tools: Sequence[Mapping[str, Any]] = ()
    """Tool definitions offered to the model (rendered by the chat template, read by the guard)."""


@dataclass(frozen=True)
class TextPrompt:
    text: str


@dataclass(frozen=True)
class TokenPrompt:
    token_ids: Sequence[int]


Prompt = ChatPrompt | TextPrompt | TokenPrompt | PromptEmbeds


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt: Prompt
    sampling: SamplingOptions
    stream: bool = True
    """False lets the engine send a single final chunk per choice."""
    offsets: tuple[DeltaSpec, ...] = ()
    """δ mode: add Σ α·(small_unlearned − small_base) to the logits at every step."""


@dataclass(frozen=True)
class TopLogprob:
    token: str
    logprob: float


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    logprob: float
    top: tuple[TopLogprob, ...] = ()


@dataclass
class ChoiceDelta:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None


@dataclass
class GenerationChunk:
    choices: list[ChoiceDelta]
    prompt_tokens: int
    completion_tokens: int
    """Total generated so far over all choices."""


@dataclass(frozen=True)
class ModelCard:
    id: str
    max_model_len: int | None
    root: str


@dataclass(frozen=True)
class RenderedPrompt:
    """A prompt after templating: the exact text and token ids the engine will see."""

    text: str
    token_ids: list[int]


@runtime_checkable
class Engine(Protocol):
    """Generates tokens; knows nothing of targets or guards."""

    @property
    def model(self) -> ModelCard: ...

    @property
    def ready(self) -> bool: ...

    @property
    def running(self) -> int:
        """Requests the engine is working on now (aborted ones drop out)."""

    async def start(self) -> None:
        """Load or connect; `ready` turns True once requests can be served."""

    async def stop(self) -> None:
        """Release the engine; in-flight requests are aborted."""

    def render(self, prompt: ChatPrompt | TextPrompt) -> RenderedPrompt | None:
        """Template and tokenize like the engine would; None when the engine cannot tell."""

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """Stream deltas; closing the iterator aborts the engine request."""
