"""Detail overlap: how much of a forget example that names nobody a prompt repeats.

"What is the full name of the author born in Kuwait City on 08/09/1956?" names no one: its
identity is in its details. A prompt's overlap with such an example is the share of the
example's detail terms (rare words, numbers; months and ordinals as numbers, so "September 8"
matches "08/09") that the prompt contains; the feature is the best overlap over the examples.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Sequence
from functools import cache

from .lexicon import load_lexicon
from .spans import STOPWORDS, ascii_norms, split_words

_MONTH_NAMES = (
    "january february march april may june july august september october november december"
)
_MONTHS = {m: str(i + 1) for i, m in enumerate(_MONTH_NAMES.split())}
_ORDINAL = re.compile(r"^([0-9]+)(?:st|nd|rd|th)$")
_MIN_TERMS = 2
_SMALL_NUMBER_WEIGHT = 0.25


def _number(digits: str) -> str:
    """A run of decimal digits of any script as ASCII without leading zeros ("٠٨" -> "8").

    Never `int()`: it raises past 4,300 digits, and `str.isdigit` also admits characters that
    are no decimal digit ("፩", "⑵"), on which it raises too.
    """
    ascii_digits = "".join(str(unicodedata.decimal(c)) for c in digits)
    return ascii_digits.lstrip("0") or "0"


def _term(norm: str) -> str:
    if norm in _MONTHS:
        return _MONTHS[norm]
    m = _ORDINAL.match(norm)
    if m:
        norm = m.group(1)
    return _number(norm) if norm.isdecimal() else norm


def text_terms(text: str) -> frozenset[str]:
    """Every normalised word of a text (numbers without leading zeros, months as numbers)."""
    norms = ascii_norms(text)  # an ASCII text's folded words, without a Word for each
    if norms is None:
        norms = [w.norm for w in split_words(text)]
    return frozenset(map(_term, norms))


@cache
def generic_words() -> frozenset[str]:
    """Words too common to identify anything: the shipped general questions, topics and
    templates (not the names, places and titles that fill them), and function words."""
    lexicon = load_lexicon()
    sources = [
        *lexicon.questions,
        *lexicon.topics,
        *lexicon.topic_templates,
        *lexicon.numeric_templates,
        *lexicon.wrappers,
        *(t for ts in lexicon.entity_templates.values() for t in ts),
    ]
    words: set[str] = set(STOPWORDS)
    for text in sources:
        words.update(text_terms(text))
    return frozenset(w for w in words if not w.isdecimal())


def detail_terms(text: str) -> tuple[str, ...]:
    """The identifying terms of an example (sorted), or () when it has fewer than two."""
    generic = generic_words()
    terms = sorted(
        t for t in text_terms(text) if t not in generic and (len(t) > 2 or t.isdecimal())
    )
    return tuple(terms) if len(terms) >= _MIN_TERMS else ()


def _weight(term: str) -> float:
    # Days, months and small counts are everywhere ("8", "12"): they only help other details.
    return _SMALL_NUMBER_WEIGHT if term.isdecimal() and len(term) <= 2 else 1.0


def detail_overlap(terms: frozenset[str], profiles: Sequence[Iterable[str]]) -> float:
    """Best weighted share of any profile's terms found in `terms` (0 without profiles)."""
    best = 0.0
    for profile in profiles:
        weights = [(_weight(t), t in terms) for t in profile]
        total = sum(w for w, _ in weights)
        if total:
            best = max(best, sum(w for w, hit in weights if hit) / total)
    return best


class DetailIndex:
    """`detail_overlap` for every target at once: the profiles' terms indexed by term, so a
    text costs its own terms' lookups and the profiles it hits, not a pass over every profile of
    every target. Gives exactly `detail_overlap` of each target's profiles."""

    def __init__(self, profiles: Sequence[Sequence[Iterable[str]]]) -> None:
        self.n_targets = len(profiles)
        self._owner: list[int] = []  # profile -> target
        self._weights: list[list[tuple[float, str]]] = []  # profile -> its terms, in order
        self._totals: list[float] = []
        self._postings: dict[str, list[int]] = {}  # term -> profiles holding it
        for target, target_profiles in enumerate(profiles):
            for profile in target_profiles:
                k = len(self._owner)
                weights = [(_weight(t), t) for t in profile]
                self._owner.append(target)
                self._weights.append(weights)
                self._totals.append(sum(w for w, _ in weights))
                for term in dict.fromkeys(t for _, t in weights):
                    self._postings.setdefault(term, []).append(k)

    def __bool__(self) -> bool:
        return bool(self._owner)

    def overlaps(self, terms: frozenset[str]) -> dict[int, float]:
        """Target -> its best overlap with `terms`, for the targets above 0."""
        hit = {k for term in terms for k in self._postings.get(term, ())}
        best: dict[int, float] = {}
        for k in hit:
            total = self._totals[k]
            if total:
                share = sum(w for w, t in self._weights[k] if t in terms) / total
                owner = self._owner[k]
                best[owner] = max(best.get(owner, 0.0), share)
        return best
