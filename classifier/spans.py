"""Alias matching: character spans that name a target, tolerant of case, typos and spacing.

Aliases and text are split into words (`[^\\W_]+`, case- and accent-folded). A text word (or two
adjacent text words glued together) matches an alias part (or up to three adjacent parts glued
together) exactly, or within one edit (Damerau) when the part has at least 5 characters; the
candidates come from a symmetric-deletion index, so a lookup costs a few dict probes per word.
Adjacent matched words form a chain. A chain covering the alias' first and last parts is a full
match ("Edward Sullivan" for "Edward Patrick Sullivan"); otherwise it is partial ("Majumdar").
A partial match next to another name-like word ("Aravind Rajeev" for "Rajeev Majumdar") is a
conflict: it most likely names someone else.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache

from .normalize import normalize_view

WORD_RE = re.compile(r"[^\W_]+")  # a word, of a text or of an alias
_MAX_GLUED_PARTS = 3
_FUZZY_MIN_LEN = 5
_SHORT_ALIAS_LEN = 3  # aliases this short ("AI", "IT") must match with their exact case

# Function words that are capitalised at a sentence start but never name anyone.
STOPWORDS = frozenset(
    """a about after all also am an and any are as at be been before being between both but by
    can could did do does during each either for from had has have he her here hers him his how
    i if in into is it its just me more most my neither no nor not of on once only or other our
    out over own she should so some such than that the their them then there these they this
    those through to too under until up very was we were what when where which while who whom
    whose why will with would you your tell give describe explain name list write compare
    please could can hi hey yes okay ok s t""".split()
)


_TITLE_WORDS = frozenset({"of", "the", "and", "a", "an", "in", "on", "to", "for"})


def alias_kind(alias: str) -> str:
    """Guess what an alias names: `person` (2-4 capitalised words), `title`, or `any`."""
    words = alias.split()
    if len(words) > 4 or any(w.lower() in _TITLE_WORDS for w in words) or "'" in alias:
        return "title"
    if 2 <= len(words) <= 4 and all(w[:1].isupper() for w in words):
        return "person"
    return "any"


def fold(text: str) -> str:
    """Lower-case and strip accents, keeping one character per input character where possible."""
    decomposed = unicodedata.normalize("NFKD", text.lower())
    return "".join(c for c in decomposed if not unicodedata.combining(c))


@lru_cache(maxsize=8)
def folded_words(words: frozenset[str]) -> frozenset[str]:
    """`fold` of every word, memoised: every index built for serving folds the same two word
    lists (the tokenizer's ~22 k whole words, the shipped names), 24 ms a time that was spent
    on the event loop at each change of the targets."""
    return frozenset(fold(w) for w in words)


def ascii_norms(text: str) -> list[str] | None:
    """The folded forms of `split_words(text)` for an ASCII text (its lower-cased words: no
    `Word` built), None for any other text."""
    return WORD_RE.findall(text.lower()) if text.isascii() else None


@dataclass(frozen=True, slots=True)
class Word:
    """One word of a text: character offsets, folded form, and whether it starts upper-case."""

    start: int
    end: int
    norm: str
    upper: bool


def split_words(text: str) -> list[Word]:
    """Split text into words with their character offsets."""
    out: list[Word] = []
    for m in WORD_RE.finditer(text):
        w = m.group()
        norm = w.lower() if w.isascii() else fold(w)  # ASCII: no Unicode normalisation needed
        upper = w[0].isupper()
        if out and out[-1].upper and out[-1].end == m.start() - 1 and text[out[-1].end] == "-":
            upper = True  # the second half of a capitalised hyphenated name ("Soo-jin")
        out.append(Word(m.start(), m.end(), norm, upper))
    return out


@dataclass(frozen=True, slots=True)
class AliasMatch:
    """One chain of text words matching (part of) one alias of one target."""

    target: int
    alias: int
    start: int
    end: int
    full: bool
    weight: float
    conflict: bool
    edits: int
    surname: bool = False  # a partial match covering a person alias' last word


@dataclass(frozen=True, slots=True)
class _Entry:
    target: int
    alias: int
    first: int  # first alias part covered
    last: int  # one past the last alias part covered


def _deletions(word: str) -> set[str]:
    return {word[:i] + word[i + 1 :] for i in range(len(word))}


def _within_one_edit(a: str, b: str) -> int | None:
    """Return 0 or 1 (Damerau edits between a and b) or None when they are further apart."""
    if a == b:
        return 0
    la, lb = len(a), len(b)
    if abs(la - lb) > 1:
        return None
    if la == lb:
        diff = [i for i in range(la) if a[i] != b[i]]
        if len(diff) == 1:
            return 1
        swapped = len(diff) == 2 and diff[1] == diff[0] + 1
        if swapped and a[diff[0]] == b[diff[1]] and a[diff[1]] == b[diff[0]]:
            return 1
        return None
    short, long_ = (a, b) if la < lb else (b, a)
    i = 0
    while i < len(short) and short[i] == long_[i]:
        i += 1
    return 1 if short[i:] == long_[i + 1 :] else None


def _close(word: str, part: str) -> bool:
    """A typo of a name part of three letters or more (one edit), not the part itself."""
    return len(part) >= 3 and word != part and _within_one_edit(word, part) is not None


class AliasIndex:
    """A compiled, immutable matcher for the aliases of one or more targets."""

    def __init__(
        self,
        aliases: Sequence[Sequence[str]],
        *,
        common_words: Iterable[str] = (),
        name_words: Iterable[str] = (),
        weights: Sequence[Mapping[str, float]] | None = None,
    ) -> None:
        self.aliases = tuple(tuple(a for a in group if a.strip()) for group in aliases)
        self._common = folded_words(frozenset(common_words))
        self._names = folded_words(frozenset(name_words))
        if weights is not None and len(weights) != len(self.aliases):
            raise ValueError("weights must have one mapping per target")
        self._weights = [dict(w) for w in weights] if weights is not None else None
        self._parts: list[list[list[str]]] = []
        self._exact: dict[str, list[_Entry]] = {}
        self._fuzzy: dict[str, list[tuple[str, _Entry]]] = {}
        # (first two letters, length) and (last two letters, length) of every word one edit
        # from a fuzzy key: a word that has neither cannot be one (`_may_be_near`).
        self._near_ends: set[tuple[str, int]] = set()
        self._case_exact: dict[tuple[int, int], str] = {}
        self._person = [[alias_kind(a) == "person" for a in group] for group in self.aliases]
        self._longest = 0  # the longest key: longer text words cannot match anything
        for t, group in enumerate(self.aliases):
            parts_t: list[list[str]] = []
            for a, alias in enumerate(group):
                parts = [fold(w) for w in WORD_RE.findall(alias)]
                parts_t.append(parts)
                if len("".join(parts)) <= _SHORT_ALIAS_LEN:
                    self._case_exact[(t, a)] = "".join(WORD_RE.findall(alias))
                self._add_alias(t, a, parts)
            self._parts.append(parts_t)
        # Words repeat across prompts: memoise lookups (thread-safe, bounded).
        self._cached_lookup = lru_cache(maxsize=1 << 16)(self._lookup)
        # Keys known to match nothing, not even one edit away (a fuzzy lookup found nothing, so
        # an exact one finds nothing either): a prompt whose every key is here names no alias,
        # found by two set operations in C instead of a cached call per key (~20 a prompt).
        # Bounded like the lookup cache; set operations are atomic under the GIL.
        self._clear: set[str] = set()

    def _add_alias(self, t: int, a: int, parts: list[str]) -> None:
        for first in range(len(parts)):
            for last in range(first + 1, min(first + _MAX_GLUED_PARTS, len(parts)) + 1):
                key = "".join(parts[first:last])
                entry = _Entry(t, a, first, last)
                self._longest = max(self._longest, len(key))
                self._exact.setdefault(key, []).append(entry)
                if len(key) >= _FUZZY_MIN_LEN:
                    for d in _deletions(key) | {key}:
                        self._fuzzy.setdefault(d, []).append((key, entry))
                    for n in (len(key) - 1, len(key), len(key) + 1):
                        self._near_ends.update(((key[:2], n), (key[-2:], -n)))

    def part_weight(self, part: str, target: int = 0) -> float:
        """How specific one alias word is on its own: 0 (short), 0.5 (common word or name), 1."""
        if self._weights is not None and part in self._weights[target]:
            return self._weights[target][part]
        if len(part) <= 3 or part in STOPWORDS:
            return 0.0
        if part in self._common or part in self._names:
            return 0.5
        return 1.0

    def _lookup(self, key: str, fuzzy: bool) -> tuple[tuple[_Entry, int], ...]:
        if len(key) > self._longest + 1:  # no alias key within one edit; bounds the work
            return ()
        found: dict[_Entry, int] = dict.fromkeys(self._exact.get(key, ()), 0)
        # A real word is no typo: "basis" must not match "Basil".
        if (
            fuzzy
            and len(key) >= _FUZZY_MIN_LEN - 1
            and key not in self._common
            and self._may_be_near(key)
        ):
            for variant in _deletions(key) | {key}:
                for alias_key, entry in self._fuzzy.get(variant, ()):
                    if entry in found:
                        continue
                    edits = _within_one_edit(key, alias_key)
                    if edits is not None:
                        found[entry] = edits
        return tuple(found.items())

    def _may_be_near(self, key: str) -> bool:
        """Whether `key` may be one edit (Damerau: a letter deleted, added, changed, or two
        neighbours swapped) from a fuzzy key, judged by two set lookups instead of its
        deletions (most words of a text are no typo of a name). One edit of a key of five
        letters or more leaves its first two letters or its last two in place (an edit in the
        first two letters is at least three from the end), and changes its length by at most
        one; `_near_ends` holds both ends of every key at the three lengths."""
        n = len(key)
        return (key[:2], n) in self._near_ends or (key[-2:], -n) in self._near_ends

    def lookup(self, word: str) -> bool:
        """Whether one folded word (or two glued) is, or is one typo away from, alias words."""
        return bool(self._cached_lookup(word, True))

    def _keys(self, norms: Sequence[str]) -> Iterator[tuple[int, int, str, bool]]:
        """Every lookup `match` makes in a text of words `norms` (folded): (first word, end
        word, key, fuzzy)."""
        for i, norm in enumerate(norms):
            yield i, i + 1, norm, True
            if i + 1 < len(norms) and norm not in STOPWORDS:
                nxt = norms[i + 1]
                # Two glued words ("Naka mura"): exact, or fuzzy when neither is a real word.
                if nxt not in STOPWORDS:
                    yield i, i + 2, norm + nxt, norm not in self._common and nxt not in self._common

    def names_none(self, norms: list[str]) -> bool:
        """Whether a text of folded words `norms` surely names no alias: none of the keys
        `match` would look up (each word, and two words glued as `_keys` glues them) matches
        any alias word, even one edit away. False: `match` must look (it may find nothing)."""
        clear = self._clear
        glued = [
            a + b for a, b in zip(norms, norms[1:], strict=False)
            if a not in STOPWORDS and b not in STOPWORDS
        ]  # fmt: skip
        if clear.issuperset(norms) and clear.issuperset(glued):
            return True
        for key in {*norms, *glued}.difference(clear):
            if self._cached_lookup(key, True):
                return False
            if len(clear) >= 1 << 16:
                clear.clear()
            clear.add(key)
        return True

    def match(
        self, text: str, words: list[Word] | None = None, norms: list[str] | None = None
    ) -> list[AliasMatch]:
        """Every full or partial alias match in text, for every target. `norms`: the text's
        `ascii_norms`, where the caller has them."""
        if words is None:
            # Most prompts name no alias: an ASCII text's folded words are its lower-cased
            # regex words, so they can be ruled out before any `Word` is built.
            norms = ascii_norms(text) if norms is None else norms
            if norms is not None and self.names_none(norms):
                return []
            words = split_words(text)
        hits: dict[tuple[int, int], list[tuple[int, int, _Entry, int]]] = {}
        for i, j, key, fuzzy in self._keys([w.norm for w in words]):
            for entry, edits in self._cached_lookup(key, fuzzy):
                hits.setdefault((entry.target, entry.alias), []).append((i, j, entry, edits))
        matches: list[AliasMatch] = []
        lower_only = not any(c.isupper() for c in text)
        for (t, a), group in hits.items():
            matches.extend(self._chains(text, words, t, a, group, lower_only))
        return matches

    def match_view(self, text: str) -> list[AliasMatch]:
        """`match` on the text and on its de-obfuscated view ("H4rry P0tt3r"), with the view's
        matches mapped back to character offsets of `text` (duplicates dropped)."""
        matches = self.match(text)
        view = normalize_view(text)
        if view.text == text:
            return matches
        seen = {(m.target, m.alias, m.start, m.end) for m in matches}
        for m in self.match(view.text):
            start, end = view.source_span(m.start, m.end)
            if (m.target, m.alias, start, end) not in seen:
                seen.add((m.target, m.alias, start, end))
                matches.append(replace(m, start=start, end=end))
        return matches

    def _chains(
        self,
        text: str,
        words: list[Word],
        t: int,
        a: int,
        hits: list[tuple[int, int, _Entry, int]],
        lower_only: bool,
    ) -> list[AliasMatch]:
        parts = self._parts[t][a]
        out: list[AliasMatch] = []
        used: set[int] = set()
        by_start: dict[int, list[tuple[int, int, _Entry, int]]] = {}
        for h in hits:  # indexed by start word: chaining stays linear in the number of hits
            by_start.setdefault(h[0], []).append(h)
        for start in sorted(hits, key=lambda h: (h[0], h[3], h[2].first, -h[1])):
            if start[0] in used:
                continue
            chain = [start]
            while True:
                end, last = chain[-1][1], chain[-1][2].last
                nxt = [h for h in by_start.get(end, ()) if h[2].first >= last]
                if not nxt:
                    break
                chain.append(min(nxt, key=lambda h: (h[2].first, h[3], -h[1])))
            used.update(range(chain[0][0], chain[-1][1]))
            i, j = chain[0][0], chain[-1][1]
            covered = {p for h in chain for p in range(h[2].first, h[2].last)}
            edits = sum(h[3] for h in chain)
            if edits == 0:  # "Jane Austin", "Stephen Kng": one typo beside an exact part
                i, j, covered, edits = self._extend(words, parts, i, j, covered)
                used.update(range(i, j))
            if (t, a) in self._case_exact:
                found = "".join(WORD_RE.findall(text[words[i].start : words[j - 1].end]))
                if found != self._case_exact[(t, a)]:
                    continue
            full = 0 in covered and len(parts) - 1 in covered
            if not full and not lower_only and not any(w.upper for w in words[i:j]):
                continue  # a lower-case word in cased text is a common noun ("a public park")
            glued = "".join(parts[p] for p in sorted(covered))
            weight = 1.0 if full else self.part_weight(glued, t)
            conflict = not full and self._conflicts(words, i, j, parts, lower_only)
            surname = not full and self._person[t][a] and len(parts) - 1 in covered
            s, e = words[i].start, words[j - 1].end
            out.append(AliasMatch(t, a, s, e, full, weight, conflict, edits, surname))
        return out

    @staticmethod
    def _extend(
        words: list[Word], parts: list[str], i: int, j: int, covered: set[int]
    ) -> tuple[int, int, set[int], int]:
        """Grow an exactly matched chain by one neighbouring word that is one edit from the
        alias part it would stand for. Alone such a word proves nothing (a real word, a short
        one: "Austin", "Kng"); next to the exact rest of the name it is a typo of it."""
        lo, hi = min(covered), max(covered)
        if hi + 1 < len(parts) and j < len(words) and _close(words[j].norm, parts[hi + 1]):
            return i, j + 1, covered | {hi + 1}, 1
        if lo > 0 and i > 0 and _close(words[i - 1].norm, parts[lo - 1]):
            return i - 1, j, covered | {lo - 1}, 1
        return i, j, covered, 0

    def _name_like(self, w: Word, own: Sequence[str], lower_only: bool) -> bool:
        if w.norm in STOPWORDS or w.norm in own or w.norm.isdigit():
            return False
        return w.norm in self._names if lower_only else w.upper

    def _conflicts(
        self, words: list[Word], i: int, j: int, own: Sequence[str], lower_only: bool
    ) -> bool:
        """Whether the words around [i, j) make it another person's name ("Wei Abilov")."""
        if i > 0 and self._name_like(words[i - 1], own, lower_only):
            return True
        return j < len(words) and self._name_like(words[j], own, lower_only)

    def target_weights(self, target: int) -> dict[str, float]:
        """The weight of every run of alias words of `target` (stored with a trained classifier)."""
        runs = {
            "".join(parts[i:j])
            for parts in self._parts[target]
            for i in range(len(parts))
            for j in range(i + 1, len(parts) + 1)
        }
        return {r: self.part_weight(r, target) for r in runs}

    def spans(self, text: str, target: int = 0) -> list[tuple[int, int]]:
        """Character spans that name `target`: full matches and specific, unconflicted partials."""
        return accepted_spans(self.match(text), target)


def accepted_spans(matches: Iterable[AliasMatch], target: int) -> list[tuple[int, int]]:
    """The spans of the matches for `target` that count as naming it, sorted and merged."""
    raw = sorted(
        (m.start, m.end)
        for m in matches
        if m.target == target and (m.full or (m.weight > 0 and not m.conflict))
    )
    merged: list[tuple[int, int]] = []
    for s, e in raw:
        if merged and s <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(e, merged[-1][1]))
        else:
            merged.append((s, e))
    return merged


@lru_cache(maxsize=64)
def _single_index(aliases: tuple[str, ...]) -> AliasIndex:
    return AliasIndex([aliases])


def find_spans(text: str, aliases: Sequence[str]) -> list[tuple[int, int]]:
    """Character spans of `text` that name one of `aliases` (case-insensitive, typo-tolerant,
    obfuscations undone)."""
    return accepted_spans(_single_index(tuple(aliases)).match_view(text), 0)
