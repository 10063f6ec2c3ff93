"""The classified text: every text of every turn, whatever its role, and the tool definitions."""

from __future__ import annotations

import json

from classifier import conversation_pieces, conversation_text
from classifier.conversation import segments

MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Who is Albus Dumbledore?", "name": "reader"},
    {"role": "assistant", "content": "He is the headmaster of a school."},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {
                    "name": "lookup_wizard",
                    "arguments": json.dumps({"query": "\u0048ogwarts headmaster"}),
                },
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "tool output about Minerva"},
    {
        "role": "user",
        "content": [
            {"type": "text", "text": "and when was he born?"},
            {"type": "image_url", "image_url": {"url": "http://x/Severus"}},
            {"type": "text", "text": "  keep   my spacing "},
        ],
    },
]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "lookup_wizard",
            "description": "Finds facts about a wizard of Gryffindor",
            "parameters": {
                "type": "object",
                "properties": {"query": {"type": "string", "enum": ["Quidditch", "wands"]}},
            },
        },
    }
]


def test_every_role_and_field_is_read() -> None:
    text = conversation_text(MESSAGES, TOOLS)
    for needle in (
        "You are a helpful assistant.",
        "Who is Albus Dumbledore?",
        "reader",  # name fields
        "headmaster of a school",  # assistant turns: the client writes them
        "lookup_wizard",
        "Hogwarts headmaster",  # tool-call arguments, JSON escapes undone
        "tool output about Minerva",  # tool results
        "call_1",  # ids a template may render
        "and when was he born?",
        "Severus",  # any other content part: all its strings
        "  keep   my spacing ",
        "Finds facts about a wizard of Gryffindor",  # tool definitions
        "Quidditch",
        "query",  # parameter names
    ):
        assert needle in text, needle
    assert "function" not in text.split("lookup_wizard")[0]  # "type" markup is not text


def test_pieces_say_where_each_text_came_from() -> None:
    text, pieces = conversation_pieces(MESSAGES, TOOLS)
    where = [p.where for p in pieces]
    assert where[0] == "tools[0]"
    assert "messages[1].name" in where and "messages[3].tool_calls[0].arguments" in where
    assert "messages[4].tool_call_id" in where and "messages[5].content[2]" in where
    for p in pieces:
        assert text[p.start : p.end] == p.text


def test_template_variables_are_read() -> None:
    kwargs = {
        "add_generation_prompt": True,
        "documents": [{"title": "notes", "text": "Hogwarts letters"}],
        "custom": {"hint": "about Gryffindor"},
    }
    text = conversation_text([{"role": "user", "content": "hi"}], [], kwargs)
    assert "Hogwarts letters" in text and "about Gryffindor" in text and "notes" in text
    assert "add_generation_prompt" not in text


def test_malformed_arguments_are_read_raw() -> None:
    messages = [
        {"role": "assistant", "tool_calls": [{"function": {"arguments": "{not json Harry"}}]}
    ]
    assert "{not json Harry" in conversation_text(messages)


def test_deeply_nested_arguments_do_not_overflow() -> None:
    deep = "[" * 5000 + '"Harry"' + "]" * 5000
    messages = [{"role": "assistant", "tool_calls": [{"function": {"arguments": deep}}]}]
    assert "Harry" in conversation_text(messages)


def test_deeply_nested_escaped_arguments_are_read_unescaped() -> None:
    deep = "[" * 5000 + '"\\u0048arry P\\u006ftter"' + "]" * 5000
    messages = [{"role": "assistant", "tool_calls": [{"function": {"arguments": deep}}]}]
    assert "Harry Potter" in conversation_text(messages)


def test_text_under_type_and_role_keys_and_call_ids_is_read() -> None:
    """A `type` or `role` key holds markup only when its value is the vocabulary's word; a
    template renders whatever a client puts there, and a tool call's id."""
    messages = [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "Who wrote Harry Potter",
                    "type": "function",
                    "function": {"name": "f", "arguments": {"type": "the author Rowling"}},
                }
            ],
        }
    ]
    tools = [
        {
            "type": "function",
            "function": {
                "name": "f",
                "parameters": {
                    "type": "object",
                    "properties": {"q": {"type": "string", "items": {"type": "Hogwarts"}}},
                },
            },
        }
    ]
    documents = {"documents": [{"type": "Dumbledore's notes", "role": "Snape", "text": "x"}]}
    text = conversation_text(messages, tools, documents)
    for hidden in (
        "Who wrote Harry Potter",
        "the author Rowling",
        "Hogwarts",
        "Dumbledore",
        "Snape",
    ):
        assert hidden in text, hidden
    for markup in ("function", "object", "string"):
        assert markup not in text.split(), markup


def test_nesting_deeper_than_any_limit_reads_the_text_itself() -> None:
    """No depth falls back to a repr (which writes a zero-width space as the six characters
    \\u200b, so the de-obfuscation no longer sees the name)."""
    nested: dict = {"q": "Har\u200bry"}
    for _ in range(300):
        nested = {"k": nested}
    messages = [{"role": "assistant", "tool_calls": [{"function": {"arguments": nested}}]}]
    text = conversation_text(messages)
    assert "Har\u200bry" in text and "\\u200b" not in text


def test_empty_and_missing_content() -> None:
    assert conversation_text([]) == ""
    assert conversation_text([{"role": "user", "content": None}, {"role": "user"}]) == ""


def test_long_text_windows_overlap_and_cover_everything() -> None:
    text = " ".join(f"word{i}" for i in range(600))
    pieces = segments(text, max_chars=500, overlap=100)
    assert all(len(p) <= 500 for _, p in pieces)
    assert all(text[off : off + len(p)] == p for off, p in pieces)
    assert pieces[0][0] == 0 and pieces[-1][0] + len(pieces[-1][1]) == len(text)
    for (a, pa), (b, _) in zip(pieces, pieces[1:], strict=False):
        assert b < a + len(pa)  # each window starts inside the previous one
