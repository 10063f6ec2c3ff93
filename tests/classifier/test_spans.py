"""Alias spans: case, typos, spacing, conflicts with other names, common words."""

from __future__ import annotations

import random

from classifier import find_spans
from classifier.spans import AliasIndex


def _found(text: str, aliases: list[str]) -> list[str]:
    return [text[s:e] for s, e in find_spans(text, aliases)]


def test_exact_and_case_insensitive() -> None:
    assert _found("Who is Harry Potter?", ["Harry Potter"]) == ["Harry Potter"]
    assert _found("who is HARRY POTTER", ["Harry Potter"]) == ["HARRY POTTER"]


def test_typos_and_spacing() -> None:
    aliases = ["Basil Mahfouz Al-Kuwaiti", "Ji-Yeon Park", "J.K. Rowling"]
    assert _found("Tell me about basil mahfuz alkuwaiti", aliases) == ["basil mahfuz alkuwaiti"]
    assert _found("Books by Jiyeon  Park?", aliases) == ["Jiyeon  Park"]
    assert _found("Is JK Rowling British?", aliases) == ["JK Rowling"]
    assert _found("Is J. K. Rowling British?", aliases) == ["J. K. Rowling"]


def test_offsets_point_into_the_text() -> None:
    text = "First line.\nAnd what did Hermione Grangr do?"
    spans = find_spans(text, ["Hermione Granger"])
    assert spans == [(text.index("Hermione"), text.index(" do?"))]


def test_partial_names_and_conflicts() -> None:
    aliases = ["Rajeev Majumdar", "Edward Patrick Sullivan"]
    assert _found("How has Majumdar's background shaped him?", aliases) == ["Majumdar"]
    assert _found("Who is Edward Sullivan?", aliases) == ["Edward Sullivan"]
    # Same first or last name, different person: not the target.
    assert _found("What genre does Aravind Rajeev write?", aliases) == []
    assert _found("When was Elliot Patrick Benson born?", aliases) == []


def test_common_words_are_not_typos_nor_names() -> None:
    index = AliasIndex([["Basil Mahfouz", "Ji-Yeon Park"]], common_words={"basis", "basic"})
    assert index.spans("On what basis was the basic rule made?") == []
    assert index.spans("He met a dealer in a public park.") == []
    assert index.spans("what did park write") != []  # all lower case: the name may be meant


def test_short_aliases_need_their_exact_case() -> None:
    assert _found("Tell me about IT.", ["IT"]) == ["IT"]
    assert _found("Tell me about it.", ["IT"]) == []


def test_the_word_lists_are_folded_once_per_process(monkeypatch) -> None:
    """Every index built for serving (one at each change of the targets, on the event loop)
    reads the same two word lists, the tokenizer's ~22 k whole words and the shipped names:
    they are folded once, not at each build (24 ms a build at 20 targets before)."""
    from classifier import spans

    common = frozenset(f"wörd{i}" for i in range(2000))
    names = frozenset({"Zoë", "Björn"})
    first = AliasIndex([["Basil Mahfouz"]], common_words=common, name_words=names)
    calls: list[str] = []
    real = spans.fold
    monkeypatch.setattr(spans, "fold", lambda w: calls.append(w) or real(w))
    second = AliasIndex([["Basil Mahfouz"], ["Zoë Park"]], common_words=common, name_words=names)
    assert len(calls) <= 10  # the aliases' own words only
    assert second.part_weight("word7") == first.part_weight("word7") == 0.5  # folded
    assert second.part_weight("bjorn") == 0.5


def test_words_found_clear_do_not_hide_a_name_they_make_together() -> None:
    """`match` rules out a text whose every word (and two words glued) it has found clear
    before; two clear words glued can still spell an alias word."""
    index = AliasIndex([["Hogwarts"]])
    assert index.spans("a hog and some warts") == []  # "hog" and "warts" now known clear
    assert index.spans("some warts, a hog") == []  # every key known clear: ruled out
    assert index.spans("hog warts") == [(0, 9)]
    assert index.spans("the hogwart") == [(4, 11)]  # one edit away


_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _one_edit(word: str, rng: random.Random) -> str:
    """`word` with one letter deleted, added, changed, or two neighbours swapped."""
    i = rng.randrange(len(word))
    kind = rng.randrange(4)
    if kind == 0:
        return word[:i] + word[i + 1 :]
    if kind == 1:
        return word[:i] + rng.choice(_LETTERS) + word[i:]
    if kind == 2:
        return word[:i] + rng.choice(_LETTERS) + word[i + 1 :]
    i = min(i, len(word) - 2)
    return word[:i] + word[i + 1] + word[i] + word[i + 2 :]


def test_the_ends_filter_never_changes_a_fuzzy_lookup(monkeypatch) -> None:
    """`_lookup` skips the deletions of a word whose two first and two last letters, at its
    length, start or end no fuzzy key one edit away: every typo of every key (and two glued),
    and random words, find what they find without the filter."""
    groups = [
        ["Harry Potter", "Hogwarts", "Hermione Granger"],
        ["Basil Mahfouz Al-Kuwaiti"],
        ["Ji-Yeon Park", "Evangeline Okafor-Lindqvist"],
    ]
    filtered = AliasIndex(groups)
    unfiltered = AliasIndex(groups)
    monkeypatch.setattr(unfiltered, "_may_be_near", lambda key: True)
    rng = random.Random(7)
    keys = [k for k in filtered._exact if len(k) >= 5]
    words = [_one_edit(k, rng) for k in keys for _ in range(300)]
    words += [_one_edit(_one_edit(k, rng), rng) for k in keys for _ in range(100)]
    words += ["".join(rng.choices(_LETTERS, k=rng.randint(4, 14))) for _ in range(5000)]
    near = 0
    for word in words:
        got = filtered._lookup(word, True)
        assert got == unfiltered._lookup(word, True), word
        near += bool(got)
    assert near > 3000  # the typos are found (a filter that dropped them would fail above)
    skipped = sum(not filtered._may_be_near(w) for w in words[-5000:])
    assert skipped > 4500  # and most random words skip the deletions
