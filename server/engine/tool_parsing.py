"""Tool calls in process, with vLLM's own tool-call parsers: the same constraints and the same
parsed calls as `vllm serve --enable-auto-tool-choice --tool-call-parser NAME`.

    ToolParsing(config, tokenizer)              one per engine (the parser class, chosen once)
      .check(tools)                             vLLM's 400s: `auto` needs auto tool choice on,
                                                `required` / a named tool need a parser
      .session(prompt, tools, constraint)       one per request: vLLM's `adjust_request` turns
        .constraint                             tool_choice into a structured-output constraint
        .choice() -> ChoiceTools                one per choice: streamed deltas or a whole answer
          .delta(text, ids, prompt_ids, done)   -> content + tool-call pieces (vLLM's parse_delta)
          .whole(text, ids, finish)             -> content + whole calls (vLLM's parse)

Ref: vllm/entrypoints/openai/chat_completion/serving.py (stream and full generators),
vllm/parser/abstract_parser.py. vLLM is imported lazily: only engines that parse use it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

from server.engine.base import (
    ChatPrompt,
    ChoiceDelta,
    FinishReason,
    ToolCallDelta,
    ToolOptions,
)
from server.errors import InvalidRequestError


@dataclass(frozen=True)
class ToolParserConfig:
    """Tool-call settings (vLLM's `--tool-call-parser`, `--enable-auto-tool-choice`)."""

    parser: str | None = None
    enable_auto_tool_choice: bool = False


@dataclass
class ParsedDelta:
    """What one engine delta becomes for the client."""

    content: str | None
    tool_calls: list[ToolCallDelta]


@dataclass
class ParsedAnswer:
    content: str | None
    """None when the answer is only tool calls (as vLLM returns it)."""
    tool_calls: list[ToolCallDelta]
    finish_reason: FinishReason | None


class ToolParsing:
    """vLLM's parser class for this engine (None when no parser is configured)."""

    def __init__(self, config: ToolParserConfig, tokenizer: Any) -> None:
        self._config = config
        self._tokenizer = tokenizer
        self._cls: Any = None
        if config.parser:
            from vllm.parser import ParserManager

            self._cls = ParserManager.get_parser(
                tool_parser_name=config.parser,
                enable_auto_tools=config.enable_auto_tool_choice,
                tokenizer=tokenizer,
            )

    @property
    def auto(self) -> bool:
        return self._config.enable_auto_tool_choice and self._has_tool_parser

    @property
    def _has_tool_parser(self) -> bool:
        return self._cls is not None and self._cls.tool_parser_cls is not None

    def check(self, tools: ToolOptions) -> None:
        """Refuse what vLLM's server refuses for the same settings (400, param tool_choice)."""
        choice = tools.tool_choice
        if self._has_tool_parser or choice == "none":
            return
        if choice == "auto":
            raise InvalidRequestError(
                '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser '
                "to be set (obliviate: --tools.enable-auto-tool-choice, --tools.tool-call-parser)",
                param="tool_choice",
            )
        described = (
            f'function "{choice["function"]["name"]}"' if isinstance(choice, Mapping) else choice
        )
        raise InvalidRequestError(
            f"tool_choice={described} requires --tool-call-parser to be set "
            "(obliviate: --tools.tool-call-parser)",
            param="tool_choice",
        )

    def session(
        self,
        prompt: ChatPrompt | None,
        tools: ToolOptions,
        constraint: Mapping[str, Any] | None,
    ) -> ToolSession:
        """vLLM's request for the parser, adjusted as vLLM adjusts it (structured outputs)."""
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
        from vllm.exceptions import VLLMValidationError

        body: dict[str, Any] = {
            "model": "obliviate",
            "messages": prompt.openai_messages() if prompt else [{"role": "user", "content": ""}],
            "tools": [dict(t) for t in tools.tools],
            "tool_choice": tools.tool_choice,
            "parallel_tool_calls": tools.parallel_tool_calls,
        }
        if constraint:
            body["structured_outputs"] = dict(constraint)
        try:
            request = ChatCompletionRequest.model_validate(body)
        except (ValueError, VLLMValidationError) as e:
            raise InvalidRequestError(_first_line(e), param="tool_choice") from e
        kwargs = dict(prompt.template_kwargs) if prompt else {}
        if self._cls is not None and request.tool_choice != "none":
            try:
                request = self._new_parser(request, kwargs).adjust_request(request)
            except (ValueError, VLLMValidationError) as e:
                raise InvalidRequestError(_first_line(e), param="tools") from e
        return ToolSession(self, request, kwargs)

    def _new_parser(self, request: Any, kwargs: dict[str, Any]) -> Any:
        return self._cls(self._tokenizer, request.tools, chat_template_kwargs=kwargs)


class ToolSession:
    """One request's tool handling: its constraint and a parser per choice."""

    def __init__(self, parsing: ToolParsing, request: Any, kwargs: dict[str, Any]) -> None:
        self._parsing = parsing
        self._request = request
        self._kwargs = kwargs

    @property
    def constraint(self) -> dict[str, Any] | None:
        """The structured-output constraint to sample under (StructuredOutputsParams kwargs)."""
        params = self._request.extract_structured_outputs()
        if params is None:
            return None
        return {f.name: getattr(params, f.name) for f in fields(params) if f.init}

    def choice(self) -> ChoiceTools:
        parser = None
        if self._parsing._cls is not None:
            parser = self._parsing._new_parser(self._request, self._kwargs)
        return ChoiceTools(self._parsing, self._request, parser)


class ChoiceTools:
    """Parses one choice's answer the way vLLM's chat server does."""

    def __init__(self, parsing: ToolParsing, request: Any, parser: Any) -> None:
        self._parsing = parsing
        self._request = request
        self._parser = parser
        self._streamed_calls = False

    @property
    def _named(self) -> bool:
        from vllm.entrypoints.openai.chat_completion.protocol import (
            ChatCompletionNamedToolChoiceParam,
        )

        return isinstance(self._request.tool_choice, ChatCompletionNamedToolChoiceParam)

    def delta(
        self,
        text: str,
        token_ids: Sequence[int],
        prompt_ids: Sequence[int] | None,
        finished: bool,
    ) -> ParsedDelta | None:
        """One streamed delta; None when nothing is ready to send (a tool-call control token)."""
        if self._parser is None:
            return ParsedDelta(text, [])
        message = self._parser.parse_delta(
            delta_text=text,
            delta_token_ids=list(token_ids),
            request=self._request,
            prompt_token_ids=list(prompt_ids) if prompt_ids is not None else None,
            finished=finished,
        )
        if message is None:
            return None
        calls = [
            ToolCallDelta(
                index=c.index,
                id=c.id,
                name=c.function.name if c.function else None,
                arguments=c.function.arguments if c.function else None,
            )
            for c in message.tool_calls or []
            if self._request.parallel_tool_calls is not False or c.index == 0
        ]
        if calls:
            self._streamed_calls = True
        return ParsedDelta(message.content, calls)

    def finish(self, reason: FinishReason | None) -> FinishReason | None:
        """The streamed finish reason: `tool_calls` once calls were streamed (not named)."""
        if self._streamed_calls and not self._named and reason == "stop":
            return "tool_calls"
        return reason

    def whole(
        self, text: str, token_ids: Sequence[int], reason: FinishReason | None
    ) -> ParsedAnswer:
        """A whole answer (non-streaming), as vLLM's full generator builds the message."""
        from vllm.renderers.chat_utils import make_tool_call_id

        request = self._request
        if self._parser is None:
            return ParsedAnswer(text, [], reason)
        _, content, parsed = self._parser.parse(
            text, request, enable_auto_tools=self._parsing.auto, model_output_token_ids=token_ids
        )
        required = request.tool_choice == "required"
        calls = [
            ToolCallDelta(
                index=i, id=c.id or make_tool_call_id(), name=c.name, arguments=c.arguments
            )
            for i, c in enumerate(parsed or [])
        ]
        if request.parallel_tool_calls is False:
            calls = calls[:1]
        if self._named or required:
            finish = "tool_calls" if required and reason == "stop" else reason
            return ParsedAnswer(content or "", calls, finish)
        if request.tool_choice == "none" or not self._parsing.auto:
            return ParsedAnswer(content, [], reason)
        return ParsedAnswer(content, calls, "tool_calls" if calls else reason)


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


class ToolStream:
    """Applies one request's tool parsing to the engine's choice deltas (any engine)."""

    def __init__(self, session: ToolSession, stream: bool) -> None:
        self._session = session
        self._stream = stream
        self._choices: dict[int, ChoiceTools] = {}
        self._texts: dict[int, list[str]] = {}
        self._ids: dict[int, list[int]] = {}

    def apply(self, delta: ChoiceDelta, prompt_ids: Sequence[int] | None) -> ChoiceDelta | None:
        """The delta with its text parsed into content and tool calls; None: nothing to send."""
        tools = self._choices.get(delta.index)
        if tools is None:
            tools = self._choices[delta.index] = self._session.choice()
        raw = delta.text
        if not self._stream:
            # One final chunk per choice: parse the whole answer, as vLLM's full generator.
            self._texts.setdefault(delta.index, []).append(raw)
            self._ids.setdefault(delta.index, []).extend(delta.token_ids)
            if delta.finish_reason is None:
                return None
            whole = "".join(self._texts[delta.index])
            answer = tools.whole(whole, self._ids[delta.index], delta.finish_reason)
            return replace(
                delta,
                text=answer.content or "",
                null_content=answer.content is None,
                tool_calls=answer.tool_calls or None,
                finish_reason=answer.finish_reason,
                raw_text=whole,  # everything the model wrote: the output guard reads it
            )
        done = delta.finish_reason is not None
        parsed = tools.delta(raw, delta.token_ids, prompt_ids, done)
        if parsed is None and not done and delta.logprobs is None:
            return None
        return replace(
            delta,
            text=(parsed.content or "") if parsed else "",
            null_content=parsed is None or parsed.content is None,
            tool_calls=(parsed.tool_calls or None) if parsed else None,
            finish_reason=tools.finish(delta.finish_reason),
            raw_text=raw,
        )
