"""Augmentation: variants of the forget examples, near misses without the target's names."""

from __future__ import annotations

import random

from classifier.augment import alias_variants, augment_positives, near_misses, template_pairs
from classifier.lexicon import load_lexicon
from classifier.spans import AliasIndex, alias_kind

ALIASES = ["Rajeev Majumdar", "Hogwarts"]
EXAMPLES = [
    "What genre does Rajeev Majumdar write in?",
    "When was the author born in Dhaka in 1951?",
]


def test_alias_kinds_and_variants() -> None:
    assert alias_kind("Rajeev Majumdar") == "person"
    assert alias_kind("The Lord of the Rings") == "title"
    assert alias_kind("Hogwarts") == "any"
    assert "Majumdar" in alias_variants("Rajeev Majumdar")
    assert "Edward Sullivan" in alias_variants("Edward Patrick Sullivan")
    assert "Ji Yeon Park" in alias_variants("Ji-Yeon Park")


def test_positives_are_varied_and_grouped() -> None:
    index = AliasIndex([ALIASES])
    out = augment_positives(EXAMPLES, ALIASES, index, random.Random(0), load_lexicon(), 8)
    texts = [t for t, _ in out]
    assert len(set(texts)) == len(texts) > 10
    assert {g for _, g in out} == {0, 1}
    assert set(EXAMPLES) <= set(texts)
    first = [t for t, g in out if g == 0]
    # Case, wrapper, alias and typo variants all show up.
    assert any(t != t.lower() and t.lower() in {x.lower() for x in first} for t in first)
    assert any(len(t) > len(EXAMPLES[0]) + 10 for t in first)
    assert any("Majumdar" in t and "Rajeev" not in t for t in first)


def test_near_misses_drop_the_target() -> None:
    index = AliasIndex([ALIASES])
    out = near_misses(EXAMPLES, ALIASES, index, random.Random(0), load_lexicon(), 6, 6)
    named = [t for t, g in out if g == 0]
    unnamed = [t for t, g in out if g == 1]
    assert len(named) == 6 and len(unnamed) == 6
    assert all(not index.spans(t) for t in named)
    assert all("Dhaka" not in t or "1951" not in t for t in unnamed)


def test_template_pairs_match_in_number() -> None:
    pos, neg = template_pairs(ALIASES, random.Random(0), load_lexicon(), 5, 10)
    assert len(pos) == len(neg) == 10
    assert {g for _, g in pos} == {10, 11}
