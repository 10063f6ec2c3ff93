"""No text turns the guard off: the classifier, the span finder, the de-obfuscated view, the
conversation reader and the stream scanner never raise, whatever Unicode they are given, and
alias matching stays linear in the prompt's length (bench/alias_scaling.py measures it)."""

from __future__ import annotations

import sys
import unicodedata

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from classifier import (
    ClassifierBank,
    Embedder,
    StreamScanner,
    TargetClassifier,
    conversation_text,
    find_spans,
)
from classifier.normalize import _view, has_view, normalize_view
from classifier.spans import AliasIndex, ascii_norms, split_words
from classifier.stream import Mention

# Every character category, lone surrogates (valid in JSON escapes) and format characters too.
ANY_CHAR = st.characters(codec=None, categories=None)
ANY_TEXT = st.text(ANY_CHAR, max_size=300)
ALIASES = ["Harry Potter", "Hogwarts", "J.K. Rowling", "Hermione Granger", "Voldemort"]
# Every digit-like character Python knows: decimal digits of every script, and the other
# numbers str.isdigit() admits ("፩", "⑵", "²") on which int() raises.
DIGITS = "".join(
    chr(c) for c in range(sys.maxunicode + 1) if unicodedata.category(chr(c)) in ("Nd", "No")
)
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def bank(embedder: Embedder, hp_classifier: TargetClassifier) -> ClassifierBank:
    return ClassifierBank(embedder, [hp_classifier])


@SETTINGS
@given(text=ANY_TEXT)
def test_the_classifier_never_raises(bank: ClassifierBank, text: str) -> None:
    decisions = bank.classify_all([text, "Who wrote Harry Potter? " + text])
    assert len(decisions) == 1
    assert decisions[0].flagged  # the second text names the target in full


@SETTINGS
@given(text=ANY_TEXT)
def test_spans_and_the_view_never_raise_and_stay_in_bounds(text: str) -> None:
    for start, end in find_spans(text + " Harry Potter", ALIASES):
        assert 0 <= start < end <= len(text) + 13
    view = normalize_view(text)
    for i in range(len(view.text)):
        start, end = view.source_span(i, i + 1)
        assert 0 <= start < end <= len(text)


# ASCII with what every obfuscation is made of: digits, @ and $, and separators between
# single letters ("H.a.r.r.y", "H4rry", "P@tter").
OBFUSCATION_PARTS = st.lists(
    st.sampled_from([*"HarryPotterab xyz", *"0134578@$", *".-_* \t\n", "I ", "a b c", "H.a.r"]),
    max_size=40,
).map("".join)


# Obfuscations beside what a model writes that the view keeps (accents, curly quotes, dashes)
# and what it does not (look-alike letters, full-width ones, a zero-width space, a ligature).
MIXED_PARTS = st.lists(
    st.sampled_from(
        [*"HarryPotterab xyz", *"0134578@$", *".-_* \n", "I ", "a b c", "19th", "CO2", "1990s",
         *"éçñü’“”—–", "\u041d\u0430rr\u0443", "\u0420\u043e", "\uff28", "\u200b", "\ufb01"]
    ),
    max_size=40,
).map("".join)  # fmt: skip


@settings(max_examples=600, deadline=None)
@given(text=st.one_of(OBFUSCATION_PARTS, MIXED_PARTS, st.text(max_size=80), ANY_TEXT))
def test_the_shortcut_for_text_the_view_keeps_gives_the_full_view(text: str) -> None:
    """`normalize_view` returns a text as it is when `has_view` says nothing in it changes:
    ASCII or not, that is `_view`'s answer."""
    assert normalize_view(text) == _view(text)
    if not has_view(text):
        assert _view(text).text == text


@SETTINGS
@given(
    contents=st.lists(
        st.one_of(
            ANY_TEXT, st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": ANY_TEXT}))
        ),
        max_size=4,
    ),
    args=ANY_TEXT,
)
def test_the_conversation_reader_never_raises(contents: list, args: str) -> None:
    messages = [{"role": "user", "content": c} for c in contents]
    messages.append({"role": "assistant", "tool_calls": [{"function": {"arguments": args}}]})
    conversation_text(messages, [{"function": {"name": args}}])


@SETTINGS
@given(text=ANY_TEXT, cut=st.integers(0, 400))
def test_the_stream_scanner_never_raises(bank: ClassifierBank, text: str, cut: int) -> None:
    scanner, _ = bank.stream_scanner()
    streamed = text + " Harry Potter"
    released = min(cut, len(text))
    mentions, hold = scanner.scan(streamed, released, final=True)
    assert hold == len(streamed)
    assert mentions  # the name at the end is always found
    for m in mentions:
        assert 0 <= m.start < m.end <= len(streamed)


def test_digits_of_every_script(bank: ClassifierBank) -> None:
    text = f"Who wrote Harry Potter? {DIGITS} {DIGITS[::-1]} ፩ ⑵ ²³ " + "9" * 5000
    assert bank.classify_all([text])[0].flagged
    assert bank.classify_all([DIGITS])[0].stage in ("static", "full")


@pytest.mark.parametrize(
    "text",
    [
        "Harry " * 17_000,  # one alias word 17,000 times: many partial hits to chain
        "x" * 100_000,  # one word longer than any alias: no fuzzy lookups
        "H.a.r.r.y " * 10_000,  # the de-obfuscated view on every word
        "Potter Harry " * 7_700,  # alias words in the wrong order
        "\ud800" * 100_000,  # lone surrogates
        "٣" * 100_000,  # one 100,000-digit number (int() refuses past 4,300 digits)
    ],
    ids=["repeated-alias", "one-long-word", "spelled-out", "alias-soup", "surrogates", "digits"],
)
def test_100k_character_prompts(bank: ClassifierBank, text: str) -> None:
    prompt = text + " Who wrote Harry Potter?"
    assert len(prompt) >= 100_000
    assert bank.classify_all([prompt])[0].flagged
    spans = find_spans(prompt, ALIASES)
    assert (len(prompt) - 13, len(prompt) - 1) in spans


@pytest.mark.parametrize(
    "text",
    ["Keep it short for reader 0-1250.", "What happened in 1997?", "It costs $5 or 4 @ 2."],
)
def test_numbers_apart_from_letters_take_the_shortcut(
    text: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Digits, @ and $ that touch no letter are no leetspeak: the view is the text, without
    the character-by-character path (half the static stage's time for such a prompt)."""
    import classifier.normalize

    assert _view(text).text == text
    monkeypatch.setattr(classifier.normalize, "_view", lambda t: pytest.fail("full path taken"))
    assert normalize_view(text).text == text


# ASCII made of alias words, their typos and glued halves, stopwords and case changes.
ALIAS_PARTS = st.lists(
    st.sampled_from(
        [
            "Harry",
            "harry",
            "HARRY",
            "Hary",
            "Potter",
            "Pottr",
            "pot",
            "ter",
            "Hog",
            "warts",
            "Hogwarts",
            "Hogwart",
            "J.K.",
            "JK",
            "Rowling",
            "Rowlng",
            "Hermione",
            "Granger",
            "Grangr",
            "Voldemort",
            "the",
            "of",
            "and",
            "who",
            "wrote",
            "a",
            "public",
            "park",
            " ",
            ", ",
            "? ",
            "-",
            "'s ",
            "1997",
            "\n",
        ]  # fmt: skip
    ),
    max_size=30,
).map(" ".join)


@settings(max_examples=400, deadline=None)
@given(text=st.one_of(ALIAS_PARTS, ALIAS_PARTS, st.text(max_size=80), ANY_TEXT))
@example("Who built Hog warts?")  # two glued words
@example("who is hermione grangr")  # a typo, lower case
@example("On what basis was the public park built?")  # common words
@example("Who is Ｈａｒｒｙ Ｐｏｔｔｅｒ?")  # not ASCII: folding, not lower-casing, reads it
def test_the_no_alias_shortcut_matches_as_the_word_by_word_path(text: str) -> None:
    index = _INDEX
    assert index.match(text) == index.match(text, split_words(text))


_INDEX = AliasIndex([ALIASES, ["Basil Mahfouz Al-Kuwaiti"]], common_words={"basis", "park"})


def test_a_prompt_naming_no_alias_builds_no_words(monkeypatch: pytest.MonkeyPatch) -> None:
    """Most prompts name no alias: their lookups rule them out before the `Word` list (a
    third of the static stage's time for a short prompt) is built."""
    import classifier.spans

    text = "What is the capital city of Australia, and when did it become the capital?"
    assert _INDEX.match(text) == []
    monkeypatch.setattr(classifier.spans, "split_words", lambda t: pytest.fail("words built"))
    assert _INDEX.match(text) == []
    with pytest.raises(pytest.fail.Exception, match="words built"):
        _INDEX.match(text.replace("Australia", "Hogwarts"))  # a name: the words are built


_SCANNER = StreamScanner(_INDEX)


@settings(max_examples=400, deadline=None)
@given(
    text=st.one_of(ALIAS_PARTS, ALIAS_PARTS, st.text(max_size=80)),
    released=st.integers(0, 200),
    final=st.booleans(),
)
@example("The school is Hogw", 0, False)  # a word that may grow into an alias
@example("He is Harry", 3, False)  # an alias word: held
@example("Ask her", 0, False)  # "her", a prefix of "hermione"
@example("Who is Ｈａｒｒｙ Ｐｏｔｔｅｒ?", 0, True)
def test_the_scanner_s_shortcut_scans_as_the_word_by_word_path(
    text: str, released: int, final: bool
) -> None:
    """On every streamed token the scanner rules out, without building words, an ASCII window
    in which no word is or could grow into an alias word; the result is the full path's."""
    import classifier.stream

    released = min(released, len(text))
    fast = _SCANNER.scan(text, released, final)
    with pytest.MonkeyPatch.context() as patched:
        patched.setattr(classifier.stream, "ascii_norms", lambda t: None)
        assert _SCANNER.scan(text, released, final) == fast


_LONG_ANSWER = st.tuples(
    st.text(st.sampled_from("abcdefgh ,.'\n"), min_size=40, max_size=400), ALIAS_PARTS
).map("".join)


@settings(max_examples=400, deadline=None)
@given(text=_LONG_ANSWER, released=st.integers(0, 500))
@example("x" * 70 + " Basil Mahfouz Al-Kuwai", 0)  # a four-part alias across the first tail
@example(" ".join(["a"] * 40) + " Hermione Gran", 0)
@example("a" * 200 + "Harry Pot", 0)  # one long word: the tail grows to the text's start
def test_the_hold_read_from_the_last_words_is_the_whole_window_s(text: str, released: int) -> None:
    """Past a word that may start an alias ("a", "in"), a long ASCII window's hold is read from
    its last words alone; it is the one read from all of its words."""
    import classifier.stream

    released = min(released, len(text))
    fast = _SCANNER.scan(text, released, False)
    with pytest.MonkeyPatch.context() as patched:
        patched.setattr(classifier.stream, "ascii_norms", lambda t: None)
        assert _SCANNER.scan(text, released, False) == fast
    read = text[max(0, released - _SCANNER.window) :]
    norms = ascii_norms(read)
    if norms and not has_view(read):  # read as it is
        assert _SCANNER._tail_hold(read, norms[-1]) == _SCANNER._hold(read, split_words(read))


def test_a_name_in_look_alike_letters_is_read_in_its_view_without_a_digit_near() -> None:
    """A streamed window with a look-alike letter is read in its de-obfuscated view, as the
    classifier reads it; the scanner used to ask for the view only where a digit, @ or $ (or
    a spelled-out word) was in the window, and let "Наrrу Роttеr" go."""
    name = "\u041d\u0430rr\u0443 \u0420\u043ett\u0435r"  # Cyrillic Н а у Р о е
    text = f"The boy is {name} now"
    assert _SCANNER.scan(text, 0, True) == ([Mention(0, 11, 23)], len(text))
    # The first name alone may still grow into the alias: held from it, nothing released.
    assert _SCANNER.scan(text[:19], 0, False) == ([], 11)
    accented = "The café’s owner wrote a long letter"  # kept by the view: read as written
    assert not has_view(accented) and _SCANNER.scan(accented, 0, True) == ([], len(accented))


def test_an_answer_ending_inside_a_name_of_several_words_names_it() -> None:
    """At the end of an answer (max_tokens), words held as the start of a name of several words
    name its target as the whole name would; one word that may start an alias is released."""
    cut = "It was written by J.K. Row"
    assert _SCANNER.scan(cut, 0, False) == ([], 18)  # held while the answer goes on
    assert _SCANNER.scan(cut, 0, True) == ([Mention(0, 18, len(cut))], len(cut))
    for ending in ("It was written by Row", "They went to the Hog", "It is a car"):
        assert _SCANNER.scan(ending, 0, True) == ([], len(ending))


def test_an_answer_ending_inside_an_alias_word_that_names_its_target_names_it() -> None:
    """One word cut by the end of an answer (max_tokens: "Hogw", "Rowl") that starts an alias
    word naming its target alone, and is no word itself, names the target: released, it was
    most of the name. A start that is a word of its own ("Park" of Parkinson, "Row", "Hog") or
    shorter than four letters is released, as when the answer goes on past it."""
    for cut, at in (("They went to Hogw", 13), ("It was written by Rowl", 18), ("Ask Herm", 4)):
        assert _SCANNER.scan(cut, 0, False) == ([], at)  # held while the answer goes on
        assert _SCANNER.scan(cut, 0, True) == ([Mention(0, at, len(cut))], len(cut))
    scanner = StreamScanner(AliasIndex([["James Parkinson"]], common_words={"park"}))
    assert scanner.scan("See Dr. Parkin", 0, True) == ([Mention(0, 8, 14)], 14)
    for ending in ("See Dr. Park", "See Dr. Par"):
        assert scanner.scan(ending, 0, False)[1] < len(ending)  # held while it goes on
        assert scanner.scan(ending, 0, True) == ([], len(ending))


def test_the_hold_of_long_alias_words_reaches_past_the_first_tail() -> None:
    """The last words are read from a tail that grows until it holds more words than the
    longest alias: a held name of long words starts before the first tail tried (24 characters)."""
    parts = ["Wolfeschlegelsteinhausen", "Bergerdorffvoralternwarengewissenhaft", "S" + "e" * 40]
    scanner = StreamScanner(AliasIndex([[" ".join(parts)]]))
    text = f"He met {parts[0]} {parts[1]} {parts[2][:35]}"
    assert scanner.scan(text, 0, False) == ([], 7)
    assert scanner._tail_hold(text, "s" + "e" * 34) == scanner._hold(text, split_words(text)) == 7


def test_a_streamed_token_builds_the_last_words_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each token's scan reads a window of the answer; where it holds a word that may start an
    alias ("a" of "a public park": not a word of every answer), only the last words are built,
    not one `Word` for each word of the window (40% of the watch's CPU a token)."""
    import classifier.stream

    built: list[str] = []
    split = classifier.stream.split_words
    monkeypatch.setattr(classifier.stream, "split_words", lambda t: built.append(t) or split(t))
    answer = "It is a big old town by the sea, and the people there like it a lot; " * 3
    for end in range(1, len(answer) + 1):
        _SCANNER.scan(answer[:end], max(0, end - 8), False)
    assert built and max(map(len, built)) <= 48 < _SCANNER.window
    built.clear()  # a last word that starts no alias word holds nothing: no word is built
    assert _SCANNER.scan("It is a big old town by the sea", 0, False) == ([], 31)
    assert built == []


def test_a_scanner_remembers_clear_words_only_and_scans_a_stream_as_a_new_one_would() -> None:
    """Each token's scan reads the window's words again; a scanner remembers the words that are
    neither an alias word nor the start of one, and then scans every step of a stream as a
    scanner that never saw a word before."""
    answer = "The old school was quiet that day. Ask her: the boy at Hogwarts is Harry Potter."
    warm = StreamScanner(_INDEX)
    for end in range(1, len(answer) + 1):
        for released in {0, max(0, end - 12), end}:
            got = warm.scan(answer[:end], released, end == len(answer))
            assert got == StreamScanner(_INDEX).scan(answer[:end], released, end == len(answer))
    assert {"the", "old", "school", "was", "quiet", "that", "day", "ask"} <= warm._clear
    assert not {"her", "hogwarts", "harry", "potter", "h", "ha", "hog"} & warm._clear


@settings(max_examples=400, deadline=None)
@given(text=st.one_of(ALIAS_PARTS, st.text(st.characters(max_codepoint=127), max_size=80)))
def test_an_ascii_text_s_norms_are_its_words_folded(text: str) -> None:
    """The shortcuts of the alias index, the stream scanner and the detail terms read an
    ASCII text's lower-cased regex words as its folded words."""
    assert ascii_norms(text) == [w.norm for w in split_words(text)]
    assert ascii_norms(text + "é") is None
