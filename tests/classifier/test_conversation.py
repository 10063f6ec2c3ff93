"""The classified text: user and system turns, all of them, nothing else, no template."""

from __future__ import annotations

from classifier import conversation_pieces, conversation_text
from classifier.conversation import segments

MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Who is Albus Dumbledore?"},
    {"role": "assistant", "content": "He is the headmaster of a school."},
    {"role": "tool", "content": "tool output"},
    {
        "role": "user",
        "content": [
            {"type": "text", "text": "and when was he born?"},
            {"type": "image_url", "image_url": {"url": "http://x"}},
            {"type": "text", "text": "  keep   my spacing "},
        ],
    },
]


def test_all_user_and_system_turns_verbatim() -> None:
    text = conversation_text(MESSAGES)
    assert text == (
        "You are a helpful assistant.\nWho is Albus Dumbledore?\n"
        "and when was he born?\n  keep   my spacing "
    )
    assert "headmaster" not in text and "tool output" not in text


def test_pieces_map_back_to_messages() -> None:
    text, pieces = conversation_pieces(MESSAGES)
    assert [(p.message, p.part) for p in pieces] == [(0, None), (1, None), (4, 0), (4, 2)]
    for p in pieces:
        content = MESSAGES[p.message]["content"]
        expected = content if p.part is None else content[p.part]["text"]  # type: ignore[index]
        assert text[p.start : p.end] == expected


def test_empty_and_missing_content() -> None:
    assert conversation_text([]) == ""
    assert conversation_text([{"role": "user", "content": None}, {"role": "user"}]) == ""


def test_long_text_is_split_without_losing_characters() -> None:
    text = " ".join(f"word{i}" for i in range(600))
    pieces = segments(text, max_chars=500)
    assert all(len(p) <= 500 for _, p in pieces)
    assert "".join(p for _, p in pieces) == text
    assert all(text[off : off + len(p)] == p for off, p in pieces)
