"""Chat templating exactly as vLLM's OpenAI server does it: the one place a chat template is applied
(the gateway's engines and guard through server/engine/templating.py, SNAP training, the
evaluation).

vLLM 0.32 (`vllm/renderers/chat_utils.py`, `vllm/renderers/hf.py`) turns a request into the
template's input this way, and so does `render_chat`:
- each turn keeps its role, its text (text parts joined by newlines; templates that loop over
  content parts get each part as `{"type": "text"}`, tool results as text), `name`, an assistant's
  `tool_calls` (arguments parsed from the JSON string into an object; invalid or non-object
  JSON becomes `{}`; an empty list is dropped) and a tool turn's `tool_call_id`; a `developer`
  turn carries `tools: None`;
- a template that never names the `developer` role gets `developer` turns as `system`, and then
  every system turn merged into one first turn (contents joined by blank lines);
- the tool definitions go in as `tools`, and the template kwargs (`chat_template_kwargs`, then
  `add_generation_prompt`, `continue_final_message`, `documents`, `reasoning_effort`) as
  keyword arguments (the gateway then tokenizes the text without extra special tokens).
"""

from __future__ import annotations

import copy
import functools
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["TemplateError", "render_chat", "template_conversation", "user_turn"]

# Keys a request may not set through chat_template_kwargs (vLLM refuses them too).
_RESERVED_KWARGS = frozenset({"chat_template", "tokenize"})


class TemplateError(ValueError):
    """The model has no usable chat template, or it cannot take this conversation; `param` names
    the request field at fault."""

    def __init__(self, message: str, *, param: str) -> None:
        super().__init__(message)
        self.param = param


def render_chat(
    tokenizer: Any,
    messages: Sequence[Mapping[str, Any]],
    *,
    tools: Sequence[Mapping[str, Any]] | None = None,
    template_kwargs: Mapping[str, Any] | None = None,
) -> str:
    """The conversation as the model reads it: its HF chat template applied to `messages` (turns
    as `template_conversation` gives them) with `tools` and the template kwargs."""
    tool_dicts = [dict(t) for t in tools] if tools else None
    try:
        template = tokenizer.get_chat_template(None, tools=tool_dicts)
    except Exception as e:
        raise TemplateError(f"The model has no usable chat template: {e}", param="messages") from e
    conversation = template_conversation(messages, template)
    kwargs = _checked_kwargs(template_kwargs or {})
    try:
        text: str = tokenizer.apply_chat_template(
            conversation, tools=tool_dicts, chat_template=template, tokenize=False, **kwargs
        )
    except Exception as e:  # the template rejects the conversation (roles, order, kwargs)
        raise TemplateError(
            f"The chat template rejected the messages: {e}", param="messages"
        ) from e
    return text


def user_turn(tokenizer: Any, text: str) -> str:
    """`text` as one user turn with the generation prompt, as a chat request carrying only it."""
    kwargs = {"add_generation_prompt": True, "continue_final_message": False}
    return render_chat(tokenizer, [{"role": "user", "content": text}], template_kwargs=kwargs)


def _checked_kwargs(given: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword arguments the template gets (reserved names refused, as vLLM does)."""
    reserved = _RESERVED_KWARGS & given.keys()
    if reserved:
        raise TemplateError(
            f"Found unexpected chat template kwargs from request: {sorted(reserved)}",
            param="chat_template_kwargs",
        )
    return dict(given)


def template_conversation(
    messages: Sequence[Mapping[str, Any]], template: str
) -> list[dict[str, Any]]:
    """The turns as the template reads them (see the module docstring)."""
    parts = _reads_content_parts(template)
    conversation: list[dict[str, Any]] = []
    for message in messages:
        turn: dict[str, Any] = {"role": message["role"]}
        content = message["content"]
        if parts and message["role"] != "tool":  # tool results reach templates as text
            texts = message.get("parts")
            texts = [content] if texts is None else texts
            turn["content"] = [{"type": "text", "text": t} for t in texts]
        else:
            turn["content"] = content
        if message["role"] == "assistant" and message.get("tool_calls"):
            turn["tool_calls"] = [_template_call(c) for c in message["tool_calls"]]
        if message["role"] == "tool" and "tool_call_id" in message:
            turn["tool_call_id"] = message["tool_call_id"]
        if "name" in message:
            turn["name"] = message["name"]
        if message["role"] == "developer":
            turn["tools"] = None
        conversation.append(turn)
    if any(t["role"] == "developer" for t in conversation) and not _names_developer(template):
        conversation = _merge_system_turns(
            [_as_system(t) if t["role"] == "developer" else t for t in conversation]
        )
    return conversation


def _template_call(given: Mapping[str, Any]) -> dict[str, Any]:
    call: dict[str, Any] = copy.deepcopy(dict(given))
    function = call["function"]
    arguments = function.get("arguments")
    parsed: Any = {}
    if arguments:
        try:
            parsed = json.loads(arguments) if isinstance(arguments, str) else arguments
        except json.JSONDecodeError:
            parsed = {}
    function["arguments"] = parsed if isinstance(parsed, dict) else {}
    return call


def _as_system(turn: dict[str, Any]) -> dict[str, Any]:
    converted = {k: v for k, v in turn.items() if k != "tools"}
    converted["role"] = "system"
    return converted


def _merge_system_turns(conversation: list[dict[str, Any]]) -> list[dict[str, Any]]:
    texts: list[str] = []
    others: list[dict[str, Any]] = []
    merge = False
    for i, turn in enumerate(conversation):
        if turn["role"] != "system":
            others.append(turn)
            continue
        merge = merge or i > 0 or bool(texts)
        content = turn.get("content", "")
        if isinstance(content, list):
            content = "\n".join(p["text"] for p in content if isinstance(p, dict) and "text" in p)
        if content:
            texts.append(content)
    if not merge:
        return conversation
    return [{"role": "system", "content": "\n\n".join(texts)}, *others]


@functools.lru_cache(maxsize=32)
def _names_developer(template: str) -> bool:
    return '"developer"' in template or "'developer'" in template


@functools.lru_cache(maxsize=32)
def _reads_content_parts(template: str) -> bool:
    """Whether the template loops over a message's content parts (vLLM's `openai` format,
    which vLLM finds in the template's syntax tree; a loop over `….content` is the sign)."""
    return _CONTENT_LOOP.search(template) is not None


_CONTENT_LOOP = re.compile(r"for\s+\w+\s+in\s+\w+(?:\[\s*['\"]content['\"]\s*\]|\.content(?!\w))")
