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

FinishReason = Literal["stop", "length", "abort", "tool_calls"]


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
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    bad_words: tuple[str, ...] = ()
    allowed_token_ids: tuple[int, ...] | None = None
    prompt_logprobs: int | None = None
    """Top alternatives per prompt token (-1: all); None: no prompt logprobs."""
    structured: Mapping[str, Any] | None = None
    """Structured-output constraint (vLLM `StructuredOutputsParams` keywords: json, regex,
    choice, grammar, json_object, …), already merged from `response_format`."""


@dataclass(frozen=True)
class PromptEmbeds:
    """A prompt given as input embeddings instead of token ids (a flagged ECO request).

    `embeds` is (T, H), one row per token of `token_ids`, the fully templated prompt.
    """

    embeds: torch.Tensor  # (T, H)
    token_ids: Sequence[int]


@dataclass(frozen=True)
class ChatPrompt:
    """A conversation as the client sent it: every turn (`ChatMessageParam`: role as sent,
    text, `name`, `tool_calls`, `tool_call_id`), the tool definitions as sent (OpenAI's
    `{"type": "function", "function": {...}}`), and the chat template's keyword arguments."""

    messages: Sequence[ChatMessageParam]
    tools: Sequence[Mapping[str, Any]] | None = None
    template_kwargs: Mapping[str, Any] = field(
        default_factory=lambda: {"add_generation_prompt": True, "continue_final_message": False}
    )

    def openai_messages(self) -> list[dict[str, Any]]:
        """The turns in OpenAI's request shape (for an upstream server or vLLM's parsers)."""
        out = []
        for message in self.messages:
            turn: dict[str, Any] = {k: v for k, v in message.items() if k != "parts"}
            parts = message.get("parts")
            if parts is not None:
                turn["content"] = [{"type": "text", "text": t} for t in parts] or None
            out.append(turn)
        return out


@dataclass(frozen=True)
class TextPrompt:
    text: str


@dataclass(frozen=True)
class TokenPrompt:
    token_ids: Sequence[int]


Prompt = ChatPrompt | TextPrompt | TokenPrompt | PromptEmbeds


@dataclass(frozen=True)
class ToolOptions:
    """Tool calling for one chat request (the tool definitions travel in the ChatPrompt)."""

    tools: Sequence[Mapping[str, Any]]
    """The tool definitions as sent (also in `ChatPrompt.tools`; a flagged prompt has none)."""
    tool_choice: str | Mapping[str, Any] = "auto"
    """`none`, `auto`, `required`, or `{"type": "function", "function": {"name": ...}}`."""
    parallel_tool_calls: bool | None = None


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt: Prompt
    sampling: SamplingOptions
    stream: bool = True
    """False lets the engine send a single final chunk per choice."""
    stream_every: int = 1
    """A streamed answer's tokens may come this many at a time (a choice's first and last
    chunks at once), as vLLM's `stream_interval`: fewer chunks for a reader that needs the
    tokens in order but not one by one. An engine that cannot group them sends them singly."""
    offsets: tuple[DeltaSpec, ...] = ()
    """δ mode: add Σ α·(small_unlearned − small_base) to the logits at every step."""
    tools: ToolOptions | None = None
    """Chat with tools: the engine constrains and parses tool calls (ChoiceDelta.tool_calls)."""


@dataclass(frozen=True)
class TopLogprob:
    token: str
    logprob: float


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    logprob: float
    top: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True)
class ToolCallDelta:
    """A piece of one tool call: the first piece has `id` and `name`, later ones add
    `arguments` text (OpenAI's streamed `tool_calls` deltas; whole calls come as one piece)."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str | None = None


@dataclass(frozen=True)
class PromptLogprob:
    """One prompt token as the engine read it: its logprob and the top alternatives."""

    token_id: int
    token: str
    logprob: float | None
    """None where the engine gives none (the first prompt token)."""
    rank: int | None
    top: tuple[tuple[int, str, float, int | None], ...] = ()
    """(token id, text, logprob, rank) of each alternative, the prompt token itself first."""


@dataclass
class ChoiceDelta:
    index: int
    text: str = ""
    """Answer text for the client: with tools, the content left after tool calls are parsed."""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    tool_calls: list[ToolCallDelta] | None = None
    raw_text: str | None = None
    """What the model wrote in this delta when tool parsing changed it (else `text`)."""
    null_content: bool = False
    """The message's content is null, not "" (an answer that is only tool calls)."""


def joined_deltas(index: int, deltas: Sequence[ChoiceDelta]) -> ChoiceDelta:
    """Consecutive deltas of one choice as one delta `index`: text, tokens, logprobs, tool calls
    and raw text in order; the last one's finish and stop reason (one delta of that index:
    itself)."""
    if len(deltas) == 1 and deltas[0].index == index:
        return deltas[0]  # a streamed token's delta, most often
    logprobs = None
    if any(d.logprobs is not None for d in deltas):
        logprobs = [lp for d in deltas for lp in (d.logprobs or [])]
    last = deltas[-1]
    calls = [c for d in deltas for c in (d.tool_calls or [])]
    raw = [d.raw_text for d in deltas if d.raw_text is not None]
    return ChoiceDelta(
        index=index,
        text="".join(d.text for d in deltas),
        token_ids=[t for d in deltas for t in d.token_ids],
        logprobs=logprobs,
        finish_reason=last.finish_reason,
        stop_reason=last.stop_reason,
        tool_calls=calls or None,
        raw_text="".join(raw) if raw else None,
        null_content=all(d.null_content for d in deltas),
    )


@dataclass
class GenerationChunk:
    choices: list[ChoiceDelta]
    prompt_tokens: int
    completion_tokens: int
    """Total generated so far over all choices."""
    prompt_logprobs: list[PromptLogprob] | None = None
    """First chunk only, when asked for: one entry per prompt token."""
    prompt_token_ids: list[int] | None = None
    """First chunk only, with prompt_logprobs: the prompt's token ids."""


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
    token_strs: list[str] | None = None
    """The tokens' vocabulary strings, when asked for (/tokenize `return_token_strs`)."""


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

    async def tokenize(
        self,
        prompt: ChatPrompt | TextPrompt,
        add_special_tokens: bool | None = None,
        token_strs: bool = False,
    ) -> RenderedPrompt:
        """Template and tokenize like the engine does (the /tokenize endpoint); None for
        `add_special_tokens` is vLLM's default (on for text, off for chat)."""

    async def detokenize(self, token_ids: Sequence[int]) -> str:
        """Token ids -> text (the /detokenize endpoint)."""

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """Stream deltas; closing the iterator aborts the engine request."""
