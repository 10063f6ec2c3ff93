"""The text of a chat conversation that the classifier reads: user and system turns, no template."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

CLASSIFIED_ROLES = frozenset({"system", "developer", "user"})


@dataclass(frozen=True)
class TextPiece:
    """Where one text part of one message sits in `conversation_text`'s output."""

    message: int  # index into messages
    part: int | None  # index into a list content, None for string content
    start: int
    end: int


def _parts(content: Any) -> list[tuple[int | None, str]]:
    if content is None:
        return []
    if isinstance(content, str):
        return [(None, content)]
    if isinstance(content, Iterable):
        out: list[tuple[int | None, str]] = []
        for k, part in enumerate(content):
            if isinstance(part, Mapping) and part.get("type") == "text":
                text = part.get("text")
                if isinstance(text, str):
                    out.append((k, text))
        return out
    raise TypeError(f"unsupported message content of type {type(content).__name__}")


def content_text(content: Any) -> str:
    """The text of one message's content: a string, or the text parts of a list of parts."""
    return "\n".join(text for _, text in _parts(content))


def conversation_pieces(messages: Sequence[Mapping[str, Any]]) -> tuple[str, list[TextPiece]]:
    """`conversation_text` and where each message text part lies in it (to map spans back)."""
    chunks: list[str] = []
    pieces: list[TextPiece] = []
    pos = 0
    for i, message in enumerate(messages):
        if message.get("role") not in CLASSIFIED_ROLES:
            continue
        for k, text in _parts(message.get("content")):
            if chunks:
                pos += 1  # the joining newline
            chunks.append(text)
            pieces.append(TextPiece(i, k, pos, pos + len(text)))
            pos += len(text)
    return "\n".join(chunks), pieces


def conversation_text(messages: Sequence[Mapping[str, Any]]) -> str:
    """All system, developer and user turns, in order, joined by newlines, with no chat
    template (assistant and tool turns are the model's own words and are left out)."""
    return conversation_pieces(messages)[0]


def segments(text: str, max_chars: int = 1000) -> list[tuple[int, str]]:
    """Split a long text into (offset, piece) windows of at most `max_chars`, at line or word
    breaks, so no part of a long conversation falls outside the embedder's window."""
    if len(text) <= max_chars:
        return [(0, text)]
    out: list[tuple[int, str]] = []
    start = 0
    while start < len(text):
        end = min(start + max_chars, len(text))
        if end < len(text):
            cut = max(text.rfind("\n", start, end), text.rfind(" ", start, end))
            if cut > start + max_chars // 2:
                end = cut + 1
        out.append((start, text[start:end]))
        start = end
    return out
