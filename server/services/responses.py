"""/v1/responses: a Responses request becomes the chat request vLLM builds from it, and goes
through the same guard and engine as chat (GenerationService.start); only the output shape and
the stream's events differ.

    ResponsesRequest ──(as vLLM: instructions -> system turn, items -> turns)──> chat request
      ──> GenerationService.start (guard.protect: the one guard call) ──> engine
      ──> Response object (message + function_call items, usage), or its event stream:
          response.created, response.in_progress, output_item.added, content_part.added,
          output_text.delta …, output_text.done, content_part.done, output_item.done
          (function calls: output_item.added, function_call_arguments.delta/done, …done),
          response.completed

Ref: vllm/entrypoints/openai/responses/{serving.py,utils.py,streaming_events.py}.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from server.engine import ChoiceDelta, TokenLogprob
from server.errors import GatewayError, InvalidRequestError, error_body, validation_message
from server.protocol.chat import TEXT_PARTS, ChatCompletionRequest
from server.protocol.common import dump
from server.protocol.responses import (
    FunctionCallItem,
    IncompleteDetails,
    OutputItem,
    OutputLogprob,
    OutputMessage,
    OutputText,
    ResponseObject,
    ResponsesRequest,
    ResponseUsage,
    TopLogprob,
)
from server.services import requests
from server.services.formatting import ChoiceState
from server.services.generation import GenerationService, Tally, stream_all
from server.services.tenancy import Caller


def chat_request(req: ResponsesRequest, model: str) -> ChatCompletionRequest:
    """The chat request vLLM builds from a Responses request (same turns, tools, sampling)."""
    messages, continue_final = _messages(req)
    body: dict[str, Any] = {
        "model": model,
        "messages": messages,
        "max_completion_tokens": req.max_output_tokens,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "top_k": req.top_k,
        "min_p": req.min_p,
        "repetition_penalty": req.repetition_penalty,
        "presence_penalty": req.presence_penalty,
        "frequency_penalty": req.frequency_penalty,
        "logit_bias": req.logit_bias,
        "seed": req.seed,
        "stop": req.stop,
        "stop_token_ids": req.stop_token_ids,
        "ignore_eos": req.ignore_eos,
        "skip_special_tokens": req.skip_special_tokens,
        "include_stop_str_in_output": req.include_stop_str_in_output,
        "user": req.user,
        "safety_identifier": req.safety_identifier,
        "parallel_tool_calls": req.parallel_tool_calls,
        "chat_template_kwargs": req.chat_template_kwargs,
        "add_generation_prompt": not continue_final,
        "continue_final_message": continue_final,
        "stream": req.stream,
    }
    if req.reasoning is not None and req.reasoning.effort is not None:
        body["reasoning_effort"] = req.reasoning.effort
    if req.include and "message.output_text.logprobs" in req.include:
        body["logprobs"] = True
        body["top_logprobs"] = req.top_logprobs or 0
    fmt = req.text.format if req.text else None
    if fmt is not None and fmt.type == "json_schema":
        schema = fmt.model_dump(by_alias=True, exclude={"type"}, exclude_none=True)
        body["response_format"] = {"type": "json_schema", "json_schema": schema}
    elif fmt is not None:
        body["response_format"] = {"type": fmt.type}
    if req.structured_outputs is not None:
        body["structured_outputs"] = req.structured_outputs.model_dump(
            by_alias=True, exclude_defaults=True
        )
    if req.tools:
        body["tools"] = [
            {
                "type": "function",
                "function": t.model_dump(exclude={"type"}, exclude_none=True),
            }
            for t in req.tools
        ]
        choice = req.tool_choice or "auto"
        body["tool_choice"] = (
            choice
            if isinstance(choice, str)
            else {"type": "function", "function": {"name": choice.name}}
        )
    elif req.tool_choice not in (None, "auto", "none"):
        body["tool_choice"] = "required"  # chat's own 400: tool_choice needs tools
    try:
        return ChatCompletionRequest.model_validate(
            {k: v for k, v in body.items() if v is not None}
        )
    except ValidationError as e:
        message, param = validation_message([dict(err) for err in e.errors()])
        root = (param or "").split(".")[0]
        raise InvalidRequestError(message, param=_RESPONSES_PARAM.get(root, root or None)) from e


# Chat fields a Responses request fills, by the Responses field they come from.
_RESPONSES_PARAM = {
    "messages": "input",
    "max_completion_tokens": "max_output_tokens",
    "response_format": "text",
    "reasoning_effort": "reasoning",
    "logprobs": "include",
}


def _messages(req: ResponsesRequest) -> tuple[list[dict[str, Any]], bool]:
    """The chat turns vLLM builds (construct_input_messages), and whether the last assistant
    turn is partial (status in_progress/incomplete: continued, not answered anew)."""
    messages: list[dict[str, Any]] = []
    if req.instructions:
        messages.append({"role": "system", "content": req.instructions})
    if isinstance(req.input, str):
        messages.append({"role": "user", "content": req.input})
        return messages, False
    for item in req.input:
        kind = item.get("type", "message")
        prev = messages[-1] if messages and messages[-1]["role"] == "assistant" else None
        if kind == "function_call":
            call = {
                "id": item["call_id"],
                "type": "function",
                "function": {"name": item["name"], "arguments": item["arguments"]},
            }
            if prev is not None:
                prev.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            messages.append({"role": "tool", "content": output, "tool_call_id": item["call_id"]})
        elif item["role"] == "assistant":
            text = _assistant_text(item.get("content"))
            if text is None:
                continue
            if prev is not None and prev.get("content") is None:
                prev["content"] = text
            else:
                messages.append({"role": "assistant", "content": text})
        else:
            messages.append({"role": item["role"], "content": item.get("content")})
    last = req.input[-1] if req.input else {}
    partial = last.get("type", "message") == "message" and last.get("status") in (
        "in_progress",
        "incomplete",
    )
    return messages, partial


def _assistant_text(content: str | list[dict[str, Any]] | None) -> str | None:
    """An assistant item's text: every part's (output_text, refusal), joined by newlines as chat
    joins text parts (vLLM keeps the first part only; the rest would be lost unseen)."""
    if isinstance(content, str):
        return content
    texts = [part[TEXT_PARTS[part["type"]]] for part in content or ()]
    return "\n".join(texts) if texts else None


class ResponsesService:
    """Runs Responses requests through the chat path of a GenerationService."""

    def __init__(self, generation: GenerationService) -> None:
        self._generation = generation

    async def create_response(
        self, req: ResponsesRequest, request_id: str, caller: Caller | None = None
    ) -> ResponseObject | AsyncIterator[str]:
        """One Responses request: the response object, or its SSE event stream."""
        gen = self._generation
        model = gen.check_model(req.model)
        chat = chat_request(req, model)
        gen.limits.check_chat(chat)
        prompt = requests.chat_prompt(chat)
        sampling = requests.chat_sampling(chat)
        rid = f"resp_{request_id}"
        primed = await gen.start(
            [prompt], sampling, rid, req.stream, tools=requests.chat_tools(chat), caller=caller
        )
        shell = _Shell(req, model, rid, int(time.time()))
        if req.stream:
            return self._stream(shell, primed)
        states, used = await gen.collect(primed, 1)
        state = states[0]
        return shell.response(
            _items(state), state.finish_reason, used.prompt_tokens, used.completion_tokens
        )

    async def _stream(self, shell: _Shell, primed: list[Any]) -> AsyncIterator[str]:
        events = _Events()
        yield events.emit("response.created", response=dump(shell.response([], None)))
        yield events.emit("response.in_progress", response=dump(shell.response([], None)))
        tally = Tally(1)
        finish: str | None = None
        async for item in stream_all(primed, 1, tally):
            if isinstance(item, GatewayError):
                error = error_body(item)["error"]
                yield events.emit(
                    "error", code=error["code"], message=error["message"], param=error["param"]
                )
                return
            for event in events.delta(item):
                yield event
            finish = item.finish_reason or finish
        for event in events.close():
            yield event
        self._generation.metrics.count_tokens(tally.prompt_tokens, tally.completion_tokens)
        final = shell.response(events.items, finish, tally.prompt_tokens, tally.completion_tokens)
        yield events.emit("response.completed", response=dump(final))


@dataclass
class _Shell:
    """The parts of a response object that come from the request."""

    req: ResponsesRequest
    model: str
    id: str
    created: int

    def response(
        self,
        output: list[OutputItem],
        finish: str | None,
        input_tokens: int = 0,
        output_tokens: int = 0,
    ) -> ResponseObject:
        req = self.req
        done = finish is not None
        status = "incomplete" if finish == "length" else "completed" if done else "in_progress"
        return ResponseObject(
            id=self.id,
            created_at=self.created,
            status=status,
            incomplete_details=(
                IncompleteDetails(reason="max_output_tokens") if status == "incomplete" else None
            ),
            instructions=req.instructions,
            max_output_tokens=req.max_output_tokens,
            metadata=req.metadata,
            model=self.model,
            output=output,
            parallel_tool_calls=req.parallel_tool_calls is not False,
            reasoning=req.reasoning.model_dump() if req.reasoning else None,
            service_tier=req.service_tier or "auto",
            temperature=req.temperature,
            text=req.text.model_dump(by_alias=True, exclude_none=True) if req.text else None,
            tool_choice=(
                req.tool_choice.model_dump()
                if req.tool_choice is not None and not isinstance(req.tool_choice, str)
                else req.tool_choice or "auto"
            ),
            tools=[t.model_dump(exclude_none=True) for t in req.tools or []],
            top_logprobs=req.top_logprobs,
            top_p=req.top_p,
            usage=(
                ResponseUsage(
                    input_tokens=input_tokens,
                    output_tokens=output_tokens,
                    total_tokens=input_tokens + output_tokens,
                )
                if done
                else None
            ),
            user=req.user,
        )


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _logprobs(entries: list[TokenLogprob] | None) -> list[OutputLogprob] | None:
    if entries is None:
        return None
    return [
        OutputLogprob(
            token=e.token,
            logprob=e.logprob,
            bytes=list(e.token.encode("utf-8", errors="replace")),
            top_logprobs=[
                TopLogprob(
                    token=t.token, logprob=t.logprob, bytes=list(t.token.encode("utf-8", "replace"))
                )
                for t in e.top
            ],
        )
        for e in entries
    ]


def _items(state: ChoiceState) -> list[OutputItem]:
    """A whole answer's output items: the message (if any text), then the function calls."""
    items: list[OutputItem] = []
    text = state.content
    if text:
        items.append(
            OutputMessage(
                id=_new_id("msg"),
                status="completed",
                content=[OutputText(text=text, logprobs=_logprobs(state.logprobs))],
            )
        )
    for call in state.calls() or []:
        items.append(
            FunctionCallItem(
                id=_new_id("fc"),
                call_id=call.id or _new_id("call"),
                name=call.function.name,
                arguments=call.function.arguments,
                status="completed",
            )
        )
    return items


@dataclass
class _Events:
    """The Responses stream: numbered events, and the items they open and close."""

    seq: int = 0
    items: list[OutputItem] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    message_id: str | None = None
    calls: dict[int, FunctionCallItem] = field(default_factory=dict)
    open_call: int | None = None

    def emit(self, kind: str, **payload: Any) -> str:
        event = {"type": kind, "sequence_number": self.seq, **payload}
        self.seq += 1
        return f"event: {kind}\ndata: {json.dumps(event, ensure_ascii=False)}\n\n"

    def delta(self, delta: ChoiceDelta) -> list[str]:
        out: list[str] = []
        if delta.text:
            out += self._close_call()
            if self.message_id is None:
                self.message_id = _new_id("msg")
                index = len(self.items)
                item = OutputMessage(id=self.message_id, status="in_progress", content=[])
                out.append(
                    self.emit("response.output_item.added", output_index=index, item=dump(item))
                )
                part = OutputText(text="", logprobs=[])
                out.append(
                    self.emit(
                        "response.content_part.added",
                        output_index=index,
                        item_id=self.message_id,
                        content_index=0,
                        part=dump(part),
                    )
                )
            self.text.append(delta.text)
            out.append(
                self.emit(
                    "response.output_text.delta",
                    output_index=len(self.items),
                    item_id=self.message_id,
                    content_index=0,
                    delta=delta.text,
                    logprobs=[dump(lp) for lp in _logprobs(delta.logprobs) or []],
                )
            )
        for piece in delta.tool_calls or ():
            out += self._call_piece(piece.index, piece.id, piece.name, piece.arguments)
        return out

    def _call_piece(
        self, index: int, call_id: str | None, name: str | None, arguments: str | None
    ) -> list[str]:
        out: list[str] = []
        if index not in self.calls:
            out += self._close_message() + self._close_call()
            item = FunctionCallItem(
                id=_new_id("fc"),
                call_id=call_id or _new_id("call"),
                name=name or "",
                arguments="",
                status="in_progress",
            )
            self.calls[index] = item
            self.open_call = index
            out.append(
                self.emit(
                    "response.output_item.added", output_index=len(self.items), item=dump(item)
                )
            )
        item = self.calls[index]
        if arguments:
            item.arguments += arguments
            out.append(
                self.emit(
                    "response.function_call_arguments.delta",
                    output_index=len(self.items),
                    item_id=item.id,
                    delta=arguments,
                )
            )
        return out

    def _close_message(self) -> list[str]:
        if self.message_id is None:
            return []
        index, text = len(self.items), "".join(self.text)
        part = OutputText(text=text, logprobs=[])
        item = OutputMessage(id=self.message_id, status="completed", content=[part])
        out = [
            self.emit(
                "response.output_text.done",
                output_index=index,
                item_id=self.message_id,
                content_index=0,
                text=text,
                logprobs=[],
            ),
            self.emit(
                "response.content_part.done",
                output_index=index,
                item_id=self.message_id,
                content_index=0,
                part=dump(part),
            ),
            self.emit("response.output_item.done", output_index=index, item=dump(item)),
        ]
        self.items.append(item)
        self.message_id, self.text = None, []
        return out

    def _close_call(self) -> list[str]:
        if self.open_call is None:
            return []
        item = self.calls[self.open_call]
        item.status = "completed"
        index = len(self.items)
        out = [
            self.emit(
                "response.function_call_arguments.done",
                output_index=index,
                item_id=item.id,
                name=item.name,
                arguments=item.arguments,
            ),
            self.emit("response.output_item.done", output_index=index, item=dump(item)),
        ]
        self.items.append(item)
        self.open_call = None
        return out

    def close(self) -> list[str]:
        return self._close_message() + self._close_call()
