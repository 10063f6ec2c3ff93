"""Watching generated text as it streams: what names a target, and what to hold back.

A stream is released to the client the way stop strings are handled: text is held back only
while its last words could still become a mention of an alias ("Harry" before " Potter", "Row"
before "ling"); everything before that is released at once. When the text does name a target (a
full alias, or a specific part of one such as a surname, typos and obfuscated forms included),
the words naming it are never released.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .normalize import View, normalize_view
from .spans import (
    STOPWORDS,
    WORD_RE,
    AliasIndex,
    AliasMatch,
    Word,
    ascii_norms,
    fold,
    split_words,
)

_GAP = re.compile(r"[\s.,'\-_*·]{0,3}")  # what may separate two words of one alias mention
_MAX_CLEAR = 50_000  # norms a scanner remembers as clear (~4 MB), then it starts again
_CUT_MIN = 4  # characters of an alias word that, cut there by the end of an answer, name it


@dataclass(frozen=True)
class Mention:
    """A target named in the watched text (character offsets of the text given)."""

    target: int
    start: int
    end: int


class StreamScanner:
    """Immutable per set of targets; `scan` is cheap enough to run on every streamed token."""

    def __init__(self, index: AliasIndex) -> None:
        self._index = index
        words: set[str] = set()
        prefixes: set[str] = set()
        cut: dict[str, set[int]] = {}
        longest = 0
        for t, group in enumerate(index.aliases):
            for alias in group:
                parts = [fold(w.norm) for w in split_words(alias)]
                longest = max(longest, len(alias))
                for part in parts:
                    words.add(part)
                    prefixes.update(part[:k] for k in range(1, len(part) + 1))
                    if len(parts) == 1 or index.part_weight(part, t) >= 1.0:
                        for k in range(_CUT_MIN, len(part)):
                            if index.part_weight(part[:k], t) >= 1.0:
                                cut.setdefault(part[:k], set()).add(t)
                for a, b in zip(parts, parts[1:], strict=False):
                    words.add(a + b)  # glued ("HarryPotter")
        self._words = frozenset(words - STOPWORDS)
        self._prefixes = frozenset(prefixes)
        self._cut_words = {start: sorted(ts) for start, ts in cut.items()}
        """The starts of alias words that name a target alone ("Hogw", "Rowl"), of `_CUT_MIN`
        characters and more, that are no word of their own ("Hog", "Row": released)."""
        self._max_parts = max(
            (len(split_words(a)) for group in index.aliases for a in group), default=1
        )
        self.window = 2 * longest + 32
        """Characters before the unreleased text that a scan looks at."""
        self._clear: set[str] = set()
        """Norms seen that are neither an alias word nor the start of one (`_all_clear`)."""

    def _alias_word(self, norm: str) -> bool:
        if norm in self._words:
            return True
        return bool(self._index.lookup(norm)) if len(norm) >= 4 else False

    def _all_clear(self, norms: list[str]) -> bool:
        """Whether no norm is, or could grow into, an alias word. Every token's scan reads the
        words of the window before it again: the norms found clear are remembered (for this
        set of targets; a set in C answers most scans with one `issuperset`), at most
        `_MAX_CLEAR` of them."""
        clear = self._clear
        if clear.issuperset(norms):
            return True
        for n in norms:
            if n in clear:
                continue
            if self._alias_word(n) or n in self._prefixes:
                return False
            self._remember_clear(n)
        return True

    def _new_words_name_none(self, read: str, new: int, norms: list[str]) -> bool:
        """Whether no alias match can reach into read[new:] (the text not yet released), for an
        ASCII `read` of words `norms`: every match is a chain of words the index finds (a word,
        or two glued), or such a chain grown by one typo beside it (`AliasIndex._extend`), so
        one that ends past `new` holds a word found among the words past `new` (the first one
        possibly begun before it) or the word just before them. Those words, and one more, are
        looked up (`AliasIndex.names_none`, as `match` does first); the rest of the window was
        read on the tokens before."""
        touching = len(WORD_RE.findall(read, new))
        return self._index.names_none(norms[-(touching + 2) :])

    def scan(self, text: str, released: int, final: bool) -> tuple[list[Mention], int]:
        """Mentions overlapping text[released:], and where to hold back from (>= released;
        len(text) when nothing needs holding). `final`: the text will not grow any more."""
        start = max(0, released - self.window)
        window = text[start:]
        # Obfuscated words (look-alike letters, leetspeak, spelled out) are read in the
        # de-obfuscated view, as the classifier reads them; a word of look-alike letters is
        # folded whatever the letters around it ("Н", "На" may grow into "Наrrу").
        seen = normalize_view(window, fold_all=True)
        view = seen if seen.text != window else None  # None: most windows (`has_view`)
        read = view.text if view is not None else window
        norms = ascii_norms(read)
        if norms is not None:
            if not norms:
                return [], len(text)
            if view is None and self._new_words_name_none(read, released - start, norms):
                # Most tokens: the words past what was released, and the one before, name no
                # alias (without a `Word` per word: this runs on every streamed token).
                mentions: list[Mention] = []
            elif self._all_clear(norms):
                # No word is, or could grow into, an alias word: no mention, nothing held.
                return [], len(text)
            else:
                # Such a word is there (its norms are its words'), most often a short one that
                # starts an alias word ("a", "in"): the matcher rules the window out on its
                # norms, and only the last words, which may still grow, are built.
                mentions = self._mentions(read, view, start, released, norms)
            at = self._tail_hold(read, norms[-1])  # an index into `read`
        else:
            words = split_words(read)
            if not words:
                return [], len(text)
            mentions = []
            if not self._all_clear([w.norm for w in words]):
                mentions = self._mentions(read, view, start, released)
            at = self._hold(read, words)
        if final:
            if not mentions and at < len(read):
                mentions = self._cut_name(read, view, start, at)
            return mentions, len(text)
        if at >= len(read):
            return mentions, len(text)
        if view is not None:
            at = view.source_span(at, at + 1)[0]
        return mentions, max(start + at, released)

    def _mentions(
        self,
        read: str,
        view: View | None,
        start: int,
        released: int,
        norms: list[str] | None = None,
    ) -> list[Mention]:
        """The mentions in `read` (the window at `start`, or its view; `norms`: its ASCII
        norms, where known) reaching past `released`, as offsets of the watched text."""
        mentions: list[Mention] = []
        for m in self._index.match(read, norms=norms):
            if self._names(m):
                s, e = view.source_span(m.start, m.end) if view is not None else (m.start, m.end)
                if start + e > released:
                    mentions.append(Mention(m.target, start + s, start + e))
        return mentions

    def _cut_name(self, read: str, view: View | None, start: int, at: int) -> list[Mention]:
        """At the end of an answer (max_tokens, a stop), the words that would be held from `at`
        if it went on: when they are an alias word and the start of the next ("Harry Pott",
        "J.K. Row"), or the start of an alias word that names its target alone and is no word
        itself ("Hogw", "Rowl"), the name was cut, and names its target as the whole would. One
        word that is a word of its own ("Row", "Hog", "the") is released, as when the answer
        goes on past it."""
        tail = read[at:]
        words = split_words(tail)
        if len(words) >= 2:
            targets = sorted({m.target for m in self._index.match(tail)})
        elif words:
            targets = self._cut_words.get(fold(words[0].norm), [])
        else:
            targets = []
        s, e = view.source_span(at, len(read)) if view is not None else (at, len(read))
        return [Mention(t, start + s, start + e) for t in targets]

    def _tail_hold(self, read: str, last: str) -> int:
        """`_hold(read, split_words(read))` for an ASCII `read` whose last word's norm is
        `last`, from its last words alone: the hold reads no more than the last `_max_parts`
        of them, so a tail with more words than that (its first one possibly cut) gives the
        same. Most often the last word holds nothing, and no word is built."""
        if not self._may_hold(last, read[-1].isalnum()):
            return len(read)
        size = 24  # characters: most often the last few words
        while True:
            cut = max(0, len(read) - size)
            tail = read[cut:]
            words = split_words(tail)
            if cut == 0 or len(words) > self._max_parts:
                return cut + self._hold(tail, words) if words else len(read)
            size *= 2

    def _may_hold(self, last: str, open_word: bool) -> bool:
        """Whether the text's last word (its norm `last`) is, or may still grow into, an alias
        word: `open_word`, it ends the text and may not be finished yet."""
        if last in self._clear:
            return False
        if self._alias_word(last):
            return True
        if last in self._prefixes:
            return open_word
        self._remember_clear(last)
        return False

    def _remember_clear(self, norm: str) -> None:
        if len(self._clear) >= _MAX_CLEAR:
            self._clear.clear()
        self._clear.add(norm)

    @staticmethod
    def _names(m: AliasMatch) -> bool:
        """A full alias, or a specific part of one ("Rowling", not "Harry") not next to another
        name: what may not reach the client."""
        return m.full or (m.weight >= 1.0 and not m.conflict)

    def _hold(self, read: str, ws: list[Word]) -> int:
        """Start of the trailing words that could still grow into a mention (len(read): none)."""
        last = ws[-1]
        if not self._may_hold(last.norm, last.end == len(read)):
            return len(read)
        hold = last.start
        k = len(ws) - 2
        while k >= 0 and len(ws) - 1 - k < self._max_parts:
            w, nxt = ws[k], ws[k + 1]
            if not self._alias_word(w.norm) or not _GAP.fullmatch(read, w.end, nxt.start):
                break
            hold = w.start
            k -= 1
        return hold
