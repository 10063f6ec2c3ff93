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
_RUN = re.compile(r"[A-Za-z0-9@$]+")
_LETTERS_THEN_DIGITS = re.compile(r"[A-Za-z]{1,4}\d+")  # MP3, B52, COVID19
_DIGITS_THEN_SUFFIX = re.compile(r"\d+(?:st|nd|rd|th|s|m|k|g|kg|km|cm|mm|am|pm|x|d)", re.I)
# 3+ single characters joined by the same separator: H.a.r.r.y, H-a-r-r-y, H a r r y, H*a*r*r*y
_SPELLED = re.compile(r"(?<![^\W_])[^\W_]([.\-_*· ])(?:[^\W_]\1)+[^\W_](?![^\W_])")


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


def _join_spelled(match: re.Match[str]) -> str:
    return match.group()[::2]  # one separator between single characters, the same throughout


def normalize(text: str) -> str:
    """The de-obfuscated view of `text` (equal to it for ordinary text)."""
    if text.isascii() and not any(c.isdigit() or c in "@$.-_* " for c in text):
        return text
    out = unicodedata.normalize("NFKC", text)
    out = "".join(c for c in out if unicodedata.category(c) != "Cf")
    letters = [c for c in out if c.isalpha()]
    latin_text = sum(c.isascii() for c in letters) > len(letters) / 2
    out = _TOKEN.sub(lambda m: _fold_token(m.group(), latin_text), out)
    return _SPELLED.sub(_join_spelled, out)
