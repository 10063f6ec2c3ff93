"""What the output guard's classifier reads of an answer at a sentence end
(`window_start`): the answer since the last read, and with `--guard.output-window-words`, a
short stretch read with the words before it."""

from __future__ import annotations

from server.services.output_guard import _CLASSIFY_WINDOW, window_start

ANSWER = "The water cycle has four stages. They repeat.\n1. Evaporation\n"


def _read(text: str, checked: int, words: int) -> str:
    return text[window_start(text, checked, words) :]


def test_without_a_minimum_the_stretch_since_the_last_read_is_read_alone() -> None:
    checked = ANSWER.index("1.")
    assert _read(ANSWER, checked, 0) == "1. Evaporation\n"
    assert _read(ANSWER, 0, 0) == ANSWER


def test_a_short_stretch_is_read_with_the_words_before_it() -> None:
    checked = ANSWER.index("1.")
    assert _read(ANSWER, checked, 5) == "stages. They repeat.\n1. Evaporation\n"
    assert _read(ANSWER, checked, 2) == "1. Evaporation\n"  # two words: enough as it is
    # Fewer words in the whole answer than the minimum: all of it.
    assert _read(ANSWER, checked, 50) == ANSWER


def test_a_long_enough_stretch_is_read_alone() -> None:
    checked = ANSWER.index("They")
    assert _read(ANSWER, checked, 4) == "They repeat.\n1. Evaporation\n"


def test_nothing_new_is_nothing_to_read() -> None:
    """A sentence end with no word since the last read (a final empty delta) reads nothing:
    the caller skips a blank window, and the words before were read already."""
    assert _read(ANSWER, len(ANSWER), 12) == ""
    assert _read(ANSWER + "  ", len(ANSWER), 12).strip() == ""


def test_a_read_never_reaches_further_back_than_the_window() -> None:
    long = "word " * 200 + "End."
    checked = len(long) - 4
    got = _read(long, checked, 500)
    assert len(got) <= _CLASSIFY_WINDOW and got.endswith("End.")
    assert _read(long, 0, 0) == long[-_CLASSIFY_WINDOW:]  # as before: the last 400 characters
