"""Detail overlap and the shipped negative set."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from classifier.details import DetailIndex, detail_overlap, detail_terms, text_terms
from classifier.negatives import ENTITY, GENERAL, general_negatives

EXAMPLE = "What is the full name of the geology author born in Karachi, Pakistan on 06/30/1975?"


def test_detail_terms_keep_identifying_words_and_numbers() -> None:
    terms = detail_terms(EXAMPLE)
    assert {"geology", "1975", "30", "6"} <= set(terms)
    assert not {"what", "name", "author", "born"} & set(terms)
    assert detail_terms("What is the capital of France?") == ()


def test_paraphrase_overlaps_more_than_a_neighbour() -> None:
    profile = [detail_terms(EXAMPLE)]
    paraphrase = (
        "Who is the geology writer with the birthdate June 30, 1975, from Karachi, Pakistan?"
    )
    neighbour = "What is the full name of the author born in Lagos, Nigeria on 06/12/1971?"
    sums = "What is 6 times 30, and what is 1975 minus 30?"
    high = detail_overlap(text_terms(paraphrase), profile)
    assert high >= 0.7
    assert detail_overlap(text_terms(neighbour), profile) < 0.3
    assert detail_overlap(text_terms(sums), profile) < high
    assert detail_overlap(text_terms(paraphrase), []) == 0.0


def test_months_and_ordinals_are_numbers() -> None:
    assert {"6", "30", "1975"} <= text_terms("June 30th, 1975")
    assert {"6", "30", "1975"} <= text_terms("06/30/1975")


def test_shipped_negatives_are_deterministic_and_varied() -> None:
    negatives = general_negatives()
    assert negatives is general_negatives()
    assert len(negatives.texts) == len(set(negatives.texts)) > 2000
    assert set(negatives.kinds) == {GENERAL, ENTITY}
    assert sum(any(c.isdigit() for c in t) for t in negatives.texts) > 200


_TERMS = st.sampled_from(["kuwait", "1956", "9", "8", "novel", "basil", "nobel", "cairo", "12"])


@given(
    profiles=st.lists(  # targets -> profiles -> terms (duplicates and empty profiles included)
        st.lists(st.lists(_TERMS, max_size=6), max_size=4), min_size=1, max_size=6
    ),
    terms=st.frozensets(_TERMS, max_size=6),
)
def test_the_detail_index_gives_each_targets_overlap_exactly(
    profiles: list[list[list[str]]], terms: frozenset[str]
) -> None:
    got = DetailIndex(profiles).overlaps(terms)
    for target, target_profiles in enumerate(profiles):
        assert got.get(target, 0.0) == detail_overlap(terms, target_profiles)
