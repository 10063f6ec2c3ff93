"""What the output guard's classifier reads of an answer at a sentence end
(`window_start`): the answer since the last read, and with `--guard.output-window-words`, a
short stretch read with the words before it."""

from __future__ import annotations

from hypothesis import example, given, settings
from hypothesis import strategies as st

from server.services.output_guard import _CLASSIFY_WINDOW, sentence_read, window_start

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


def test_a_list_marker_is_read_with_the_item_after_it() -> None:
    """A sentence end with no letter since the last read ("\n2." of a numbered list) reads
    nothing yet: the stretch waits for the next sentence end, and is read with it (or at the
    answer's end), never skipped."""
    text = "1. Evaporation of water.\n2."
    checked = text.index("\n")
    assert sentence_read(text, checked, ".", False, 12) is None
    assert sentence_read(text, checked, ".", True, 12) is not None  # the answer ends there
    more = text + " Condensation."
    got = sentence_read(more, checked, " Condensation.", False, 0)
    assert got == "\n2. Condensation."
    # A stretch with a letter is read at its sentence end, as before.
    assert sentence_read("It rains. Then.", len("It rains."), ".", False, 0) == " Then."


def test_a_read_never_reaches_further_back_than_the_window() -> None:
    long = "word " * 200 + "End."
    checked = len(long) - 4
    got = _read(long, checked, 500)
    assert len(got) <= _CLASSIFY_WINDOW and got.endswith("End.")
    assert _read(long, 0, 0) == long[-_CLASSIFY_WINDOW:]  # as before: the last 400 characters


@settings(max_examples=1000, deadline=None)
@given(
    text=st.text(alphabet="ab .\n", max_size=600),
    checked=st.integers(0, 600),
    words=st.integers(0, 30),
)
@example(text="aaaa bbb", checked=2, words=2)  # the last read ended inside a word
def test_a_read_holds_all_the_new_text_and_no_more_words_than_it_needs(
    text: str, checked: int, words: int
) -> None:
    """Never less than the stretch since the last read, never past the window's bound, and
    widened only when fewer than `words` words start in the stretch, then to `words` words
    (or as far as the bound allows)."""
    checked = min(checked, len(text))
    bound = max(0, len(text) - _CLASSIFY_WINDOW)
    start = window_start(text, checked, words)
    alone = window_start(text, checked, 0)
    assert bound <= start <= alone
    if start < alone:
        cut = 0 < alone < len(text) and not text[alone - 1].isspace() and not text[alone].isspace()
        assert len(text[alone:].split()) - cut < words  # words starting in the stretch
        assert len(text[start:].split()) == words or start == bound
