"""A normalised view of a prompt that undoes common obfuscations, for the classifier to score
next to the text as sent.

    NFKC ("Ｈａｒｒｙ" -> "Harry"), zero-width and other format characters dropped
    homoglyphs: words made of Latin and look-alike Cyrillic/Greek letters -> Latin
                ("Наrrу Роttеr" -> "Harry Potter"); real Cyrillic/Greek words are kept
    leetspeak:  digits and @ $ inside words -> letters ("H4rry P0tt3r" -> "Harry Potter");
                numbers, "MP3", "1990s", "3rd" are left alone
    spelled-out words: single characters joined by one repeated separator -> one word
                ("H.a.r.r.y", "H-a-r-r-y", "H a r r y" -> "Harry")

Case and one-letter typos need no view: the alias matcher folds case and tolerates one edit.
The view is only scored when it differs from the text, so ordinary traffic costs nothing more.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache

# Cyrillic and Greek letters that render like Latin ones (lower and upper case).
_CONFUSABLES = str.maketrans(
    {
        # Cyrillic
        "а": "a", "в": "b", "е": "e", "ё": "e", "к": "k", "м": "m", "н": "h", "о": "o",
        "р": "p", "с": "c", "т": "t", "у": "y", "х": "x", "і": "i", "ј": "j", "ѕ": "s",
        "ԁ": "d", "ӏ": "l", "ԛ": "q", "ԝ": "w", "ү": "y", "һ": "h", "ɡ": "g",
        "А": "A", "В": "B", "Е": "E", "Ё": "E", "К": "K", "М": "M", "Н": "H", "О": "O",
        "Р": "P", "С": "C", "Т": "T", "У": "Y", "Х": "X", "І": "I", "Ј": "J", "Ѕ": "S",
        "Ү": "Y", "Һ": "H", "Ԛ": "Q", "Ԝ": "W",
        # Greek
        "α": "a", "β": "b", "ε": "e", "ι": "i", "κ": "k", "ν": "v", "ο": "o", "ρ": "p",
        "τ": "t", "υ": "u", "χ": "x", "γ": "y",
        "Α": "A", "Β": "B", "Ε": "E", "Ζ": "Z", "Η": "H", "Ι": "I", "Κ": "K", "Μ": "M",
        "Ν": "N", "Ο": "O", "Ρ": "P", "Τ": "T", "Υ": "Y", "Χ": "X",
    }
)  # fmt: skip
_LEET = str.maketrans(
    {"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "8": "b", "@": "a", "$": "s"}
)  # fmt: skip
_TOKEN = re.compile(r"\S+")
# A leetspeak run mixes letters with digits, @ or $: somewhere one touches the other.
_RUN = re.compile(r"[A-Za-z0-9@$]+")
_LETTERS_THEN_DIGITS = re.compile(r"[A-Za-z]{1,4}\d+")  # MP3, B52, COVID19
_DIGITS_THEN_SUFFIX = re.compile(r"\d+(?:st|nd|rd|th|s|m|k|g|kg|km|cm|mm|am|pm|x|d)", re.I)
# 3+ single characters joined by the same separator: H.a.r.r.y, H-a-r-r-y, H a r r y, H*a*r*r*y
_SPELLED = re.compile(r"(?<![^\W_])[^\W_]([.\-_*· ])(?:[^\W_]\1)+[^\W_](?![^\W_])")
# The spelled-out pattern for an ASCII text, in ASCII classes (the stream scanner asks on
# every token whether an answer's last words have a view: 1.8 against 2.6 us for 110
# characters); and what leetspeak needs at all (a text without it is most text).
_SPELLED_ASCII = re.compile(
    r"(?<![A-Za-z0-9])[A-Za-z0-9]([.\-_* ])(?:[A-Za-z0-9]\1)+[A-Za-z0-9](?![A-Za-z0-9])"
)
_LEET_CHAR = re.compile(r"[0-9@$]")
# A `_RUN` that `_fold_leet_run` may fold: a letter touches a digit, @ or $ somewhere in it.
_LEET_RUN = re.compile(r"[A-Za-z0-9@$]*(?:[A-Za-z][0-9@$]|[0-9@$][A-Za-z])[A-Za-z0-9@$]*")
_NON_ASCII = re.compile(r"[^\x00-\x7f]")


def _fold_homoglyphs(word: str, latin_text: bool) -> str:
    if word.isascii():
        return word
    folded = word.translate(_CONFUSABLES)
    # A look-alike word becomes pure ASCII letters; it is folded when it mixes scripts, or when
    # the text around it is Latin. Real Cyrillic or Greek text stays as it is.
    letters = [c for c in folded if c.isalpha()]
    if not letters or not all(c.isascii() for c in letters):
        return word
    mixed = any(c.isascii() and c.isalpha() for c in word)
    return folded if mixed or latin_text else word


def _fold_leet_run(run: str) -> str:
    letters = sum(c.isalpha() for c in run)
    leet = sum(not c.isalpha() for c in run)
    if letters < 2 or leet == 0 or leet > letters:
        return run  # numbers, "4x4", "a1"
    if _LETTERS_THEN_DIGITS.fullmatch(run) or _DIGITS_THEN_SUFFIX.fullmatch(run):
        return run
    return run.translate(_LEET)


def _fold_token(token: str, latin_text: bool) -> str:
    token = _fold_homoglyphs(token, latin_text)
    return _RUN.sub(lambda m: _fold_leet_run(m.group()), token)


@dataclass(frozen=True)
class View:
    """The de-obfuscated view of a text and, for each of its characters, where it came from."""

    text: str
    origin: tuple[int, ...] | None = None
    """origin[i]: index in the source text of view character i; None: the view is the source."""

    def source_span(self, start: int, end: int) -> tuple[int, int]:
        """The source characters behind view characters [start, end)."""
        if self.origin is None or end <= start:
            return start, end
        return self.origin[start], self.origin[end - 1] + 1


def _clean_chars(text: str) -> tuple[str, list[int]]:
    """NFKC per character ("Ｈ" -> "H", "ﬁ" -> "fi"), format characters (zero-width) and lone
    surrogates dropped; returns the text and each character's source index."""
    chars: list[str] = []
    origin: list[int] = []
    for i, c in enumerate(text):
        if c.isascii():
            chars.append(c)
            origin.append(i)
            continue
        for d in unicodedata.normalize("NFKC", c):
            if unicodedata.category(d) not in ("Cf", "Cs"):
                chars.append(d)
                origin.append(i)
    return "".join(chars), origin


def normalize_view(text: str, *, fold_all: bool = False) -> View:
    """The de-obfuscated view of `text`, with a map back to `text`'s offsets. `fold_all`:
    fold a word of look-alike letters whatever the script of the text around it (a streamed
    answer's last few words tell no script: "Н" and "а" of "Наrrу" are Cyrillic text alone)."""
    # ASCII is its own NFKC form and has no homoglyphs; a run is folded as leetspeak only if
    # it holds letters and digits (@, $), so only where a letter touches one ("H4rry", not
    # "in 2024" or "0-1250"); so only that or a spelled-out word can change it (regex scans in
    # C, where the character-by-character path below cost half the static stage's time for a
    # prompt with a number in it).
    # The same holds for a text whose other characters are all kept as they are (curly quotes,
    # dashes, accented letters: most non-ASCII text a model writes).
    if not has_view(text):
        return View(text)
    return _view(text, fold_all=fold_all)


def has_view(text: str) -> bool:
    """Whether `normalize_view` may change `text` (False: its view is `text` itself): a
    character it replaces or drops (NFKC, format characters, a Latin look-alike), leetspeak,
    or a spelled-out word."""
    if text.isascii():
        spelled = _SPELLED_ASCII
    elif all(map(_kept, set(_NON_ASCII.findall(text)))):
        spelled = _SPELLED
    else:
        return True
    if _LEET_CHAR.search(text) is not None and any(
        _fold_leet_run(run) != run for run in _LEET_RUN.findall(text)
    ):
        return True  # not "19th", "1990s", "CO2": `_fold_leet_run` keeps them
    return spelled.search(text) is not None


@lru_cache(maxsize=4096)
def _kept(c: str) -> bool:
    """Whether the view keeps the non-ASCII character `c` as it is (`_clean_chars`, and
    `_fold_homoglyphs`, which leaves a word without a look-alike letter as it is)."""
    return (
        unicodedata.normalize("NFKC", c) == c
        and unicodedata.category(c) not in ("Cf", "Cs")
        and ord(c) not in _CONFUSABLES
    )


def _view(text: str, *, fold_all: bool = False) -> View:
    """normalize_view without the shortcut for text it keeps."""
    out, origin = _clean_chars(text)
    letters = [c for c in out if c.isalpha()]
    latin_text = fold_all or sum(c.isascii() for c in letters) > len(letters) / 2
    # Homoglyph and leetspeak folding are one character for one: offsets are unchanged.
    out = _TOKEN.sub(lambda m: _fold_token(m.group(), latin_text), out)
    pieces: list[str] = []
    kept: list[int] = []
    last = 0
    for m in _SPELLED.finditer(out):  # "H.a.r.r.y" -> "Harry": every other character
        pieces += [out[last : m.start()], m.group()[::2]]
        kept += origin[last : m.start()] + origin[m.start() : m.end() : 2]
        last = m.end()
    pieces.append(out[last:])
    kept += origin[last:]
    view = "".join(pieces)
    return View(view) if view == text else View(view, tuple(kept))


def normalize(text: str) -> str:
    """The de-obfuscated view of `text` (equal to it for ordinary text)."""
    return normalize_view(text).text
