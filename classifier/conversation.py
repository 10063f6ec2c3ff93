"""Every text a client sends in a conversation, for the classifier: no role is left out.

The client writes the whole conversation, assistant and tool turns included, so the guard reads
all of it: the content of every turn (string or content parts), `name` fields, tool calls (the
function's name and its arguments), tool results, and the tool definitions offered to the model
(names, descriptions, parameter names, enums, defaults). Each text is a `TextPiece`; the
classifier scores every piece alone and all of them joined in order, so a target named in any
turn, or split across turns, is seen.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# Keys whose values are fixed markup ("type": "function", "role": "user") when the value is one of
# the vocabulary's words; any other value under them is read like every string a client sends
# (ids included: a template may render them).
_STRUCTURAL_KEYS = frozenset({"type", "role"})
_MARKUP_VALUES = frozenset(
    """function object string number integer boolean array null text input_text output_text
    image_url input_image input_audio input_file file refusal json_schema json_object
    tool tool_call custom message function_call function_call_output reasoning
    system user assistant developer""".split()
)
# Keys that are the OpenAI/JSON-schema vocabulary, not words a client chose: not read as text
# (their values are). Any other key (a parameter's name) is read.
_KEYWORDS = frozenset(
    """function name description parameters properties items required enum default arguments
    additionalProperties strict title anyOf oneOf allOf not const examples format pattern
    minimum maximum minLength maxLength minItems maxItems $defs definitions $ref $schema
    text url image_url input_audio file detail data add_generation_prompt continue_final_message
    reasoning_effort enable_thinking documents""".split()
)


@dataclass(frozen=True)
class TextPiece:
    """One text a client sent, where it came from, and where it sits in the joined text."""

    where: str  # e.g. "messages[2].content[0]", "messages[3].tool_calls[0].arguments", "tools[1]"
    text: str
    start: int
    end: int


def _strings(value: Any) -> Iterator[str]:
    """Every string inside a JSON-like value, in order: keys (parameter names carry meaning) and
    values, however deep (an explicit stack: no depth at which text is read another way)."""
    stack: list[Any] = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            yield item
        elif isinstance(item, Mapping):
            children: list[Any] = []
            for key, child in item.items():
                if not isinstance(key, str):
                    children.append(key)
                    children.append(child)
                    continue
                markup = child is None or (isinstance(child, str) and child in _MARKUP_VALUES)
                if key in _STRUCTURAL_KEYS and markup:
                    continue
                if key not in _STRUCTURAL_KEYS and key not in _KEYWORDS:
                    children.append(key)
                children.append(child)
            stack.extend(reversed(children))
        elif isinstance(item, Iterable) and not isinstance(item, bytes | bytearray):
            stack.extend(reversed(list(item)))
        elif item is not None and not isinstance(item, bool):
            yield str(item)


_JSON_ESCAPE = re.compile(r"\\(u[0-9a-fA-F]{4}|[\"\\/bfnrt])")
_SIMPLE_ESCAPES = {"b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}


def _unescaped(raw: str) -> str:
    """A JSON text's escapes undone where it cannot be parsed (too deep, or not JSON)."""

    def one(m: re.Match[str]) -> str:
        code = m.group(1)
        if code[0] == "u":
            return chr(int(code[1:], 16))
        return _SIMPLE_ESCAPES.get(code, code)

    return _JSON_ESCAPE.sub(one, raw)


def _json_text(raw: Any) -> str:
    """Tool-call arguments are a JSON string: read the strings inside it (escapes undone, so
    "\\u0048arry" reads "Harry"), else the raw text."""
    if not isinstance(raw, str):
        return " ".join(_strings(raw))
    try:
        parsed = json.loads(raw)
    except (ValueError, RecursionError):
        return _unescaped(raw)
    return " ".join(_strings(parsed))


def _content_parts(content: Any, where: str) -> Iterator[tuple[str, str]]:
    if content is None:
        return
    if isinstance(content, str):
        yield where, content
        return
    if isinstance(content, Mapping):
        content = [content]
    for k, part in enumerate(content):
        label = f"{where}[{k}]"
        if isinstance(part, str):
            yield label, part
        elif isinstance(part, Mapping) and isinstance(part.get("text"), str):
            yield label, part["text"]  # text, input_text, output_text parts
        else:  # any other part: every string it carries
            yield label, " ".join(_strings(part))


def message_texts(message: Mapping[str, Any], where: str) -> Iterator[tuple[str, str]]:
    """(where, text) of every text in one chat message, whatever its role."""
    for key in ("name", "tool_call_id"):
        if isinstance(message.get(key), str):
            yield f"{where}.{key}", message[key]
    yield from _content_parts(message.get("content"), f"{where}.content")
    for key in ("reasoning_content", "reasoning", "refusal"):
        if message.get(key):
            yield from _content_parts(message[key], f"{where}.{key}")
    for k, call in enumerate(message.get("tool_calls") or ()):
        if not isinstance(call, Mapping):
            continue
        inner = call.get("function")
        function: Mapping[str, Any] = inner if isinstance(inner, Mapping) else call
        label = f"{where}.tool_calls[{k}]"
        if isinstance(call.get("id"), str):
            yield f"{label}.id", call["id"]
        if function.get("name") is not None:
            yield f"{label}.name", str(function["name"])
        if function.get("arguments") is not None:
            yield f"{label}.arguments", _json_text(function["arguments"])


def tool_strings(tool: Any) -> list[str]:
    """The texts of one tool definition (names, descriptions, parameter names, enums)."""
    return list(_strings(tool))


def conversation_pieces(
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Any] = (),
    template_kwargs: Mapping[str, Any] | None = None,
) -> tuple[str, list[TextPiece]]:
    """All texts of the tool definitions, of the chat template's variables (a template may
    render any of them: RAG `documents`, custom fields) and of every message, in order, joined
    by newlines."""
    found: list[tuple[str, str]] = []
    for k, tool in enumerate(tools):
        text = " ".join(tool_strings(tool))
        found.append((f"tools[{k}]", text))
    for key, value in (template_kwargs or {}).items():
        if value is None or isinstance(value, bool):
            continue  # no text (add_generation_prompt=True on every chat request)
        found.append((f"template_kwargs.{key}", " ".join(_strings(value))))
    for i, message in enumerate(messages):
        found += message_texts(message, f"messages[{i}]")
    pieces: list[TextPiece] = []
    chunks: list[str] = []
    pos = 0
    for where, text in found:
        if not text.strip():
            continue
        if chunks:
            pos += 1  # the joining newline
        chunks.append(text)
        pieces.append(TextPiece(where, text, pos, pos + len(text)))
        pos += len(text)
    return "\n".join(chunks), pieces


def conversation_text(
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Any] = (),
    template_kwargs: Mapping[str, Any] | None = None,
) -> str:
    """Every text of every turn (any role), the tool definitions and the template's variables,
    joined by newlines."""
    return conversation_pieces(messages, tools, template_kwargs)[0]


def content_text(content: Any) -> str:
    """The text of one message's content: a string, or the texts of its parts."""
    return "\n".join(text for _, text in _content_parts(content, ""))


def segments(text: str, max_chars: int = 1000, overlap: int = 200) -> list[tuple[int, str]]:
    """Split a long text into (offset, piece) windows of at most `max_chars`, cut at line or
    word breaks, each overlapping the previous one by about `overlap` characters, so that no
    part of a long conversation falls outside the embedder's window and no name is cut in two."""
    if len(text) <= max_chars:
        return [(0, text)]
    out: list[tuple[int, str]] = []
    start = 0
    while True:
        end = min(start + max_chars, len(text))
        if end < len(text):
            cut = max(text.rfind("\n", start, end), text.rfind(" ", start, end))
            if cut > start + max_chars // 2:
                end = cut + 1
        out.append((start, text[start:end]))
        if end >= len(text):
            return out
        nxt = end - overlap
        space = text.find(" ", nxt, end)
        start = max(start + 1, space + 1 if space >= 0 else nxt)
