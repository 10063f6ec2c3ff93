"""Training data for one target: augmented positives and near-miss negatives.

Positives: each forget example, plus variants (paraphrase wrappers, alias substitution, case,
typo and spacing noise), plus entity templates filled with the target's aliases ("Who is X?").
Near misses: the same prompts with the target's names swapped for other names of the same kind
(or, in examples that name nothing, other places and numbers), so the head learns that the topic
or the phrasing alone is not the target.
"""

from __future__ import annotations

import random
import re
import string
from collections.abc import Callable, Sequence

from .lexicon import Lexicon
from .negatives import random_person
from .spans import AliasIndex, AliasMatch, alias_kind

Sample = tuple[str, int]  # (text, group): variants of one source share a group for CV

_CAPS_RE = re.compile(r"(?<![.?!]\s)(?<!^)\b[A-Z][\w'-]*(?:\s+(?:of\s+|the\s+)?[A-Z][\w'-]*)*")
_NUM_RE = re.compile(r"\d+")
_MONTHS = (
    "January February March April May June July August September October November December"
).split()


def alias_variants(alias: str) -> list[str]:
    """Ways a user may write an alias: as is, lower-case, without hyphens, short person forms."""
    out = [alias, alias.lower(), alias.replace("-", " "), alias.replace("-", "")]
    words = alias.split()
    if alias_kind(alias) == "person":
        if len(words) > 2:
            out.append(f"{words[0]} {words[-1]}")
        if len(words[-1]) >= 5:
            out.append(words[-1])
    return list(dict.fromkeys(out))


def _typo(text: str, rng: random.Random, focus: Sequence[tuple[int, int]] = ()) -> str:
    # Only words of 5+ letters: the matcher tolerates no typo in shorter alias words.
    spans = [m.span() for m in re.finditer(r"[A-Za-z]{5,}", text)]
    inside = [s for s in spans if any(a <= s[0] < b for a, b in focus)]
    pool = inside if inside and rng.random() < 0.6 else spans
    if not pool:
        return text
    s, e = rng.choice(pool)
    word = text[s:e]
    i = rng.randrange(1, len(word) - 1)
    op = rng.randrange(4)
    if op == 0:
        word = word[:i] + word[i + 1 :]
    elif op == 1:
        word = word[:i] + word[i] + word[i:]
    elif op == 2:
        word = word[: i - 1] + word[i] + word[i - 1] + word[i + 1 :]
    else:
        word = word[:i] + rng.choice(string.ascii_lowercase) + word[i + 1 :]
    return text[:s] + word + text[e:]


def _spacing(text: str, rng: random.Random) -> str:
    choice = rng.randrange(3)
    if choice == 0:
        return text.replace(" ", "  ", rng.randrange(1, 3))
    if choice == 1:
        return re.sub(r"([,?.]) ", r"\1", text)
    return text.replace("-", " ") if "-" in text else " " + text + " "


def _wrap(text: str, rng: random.Random, lexicon: Lexicon) -> str:
    lowered = text[:1].lower() + text[1:]
    return rng.choice(lexicon.wrappers).format(q=text, ql=lowered)


def _replace_spans(text: str, spans: Sequence[tuple[int, int]], make: Callable[[int], str]) -> str:
    out, last = [], 0
    for k, (s, e) in enumerate(sorted(spans)):
        out += [text[last:s], make(k)]
        last = e
    return "".join(out) + text[last:]


def _accepted(matches: list[AliasMatch]) -> list[AliasMatch]:
    keep = [m for m in matches if m.full or (m.weight > 0 and not m.conflict)]
    keep.sort(key=lambda m: (m.start, -(m.end - m.start)))
    out: list[AliasMatch] = []
    for m in keep:
        if not out or m.start >= out[-1].end:
            out.append(m)
    return out


def augment_positives(
    examples: Sequence[str],
    aliases: Sequence[str],
    index: AliasIndex,
    rng: random.Random,
    lexicon: Lexicon,
    n_variants: int,
) -> list[Sample]:
    """Each example and up to `n_variants` noisy paraphrases of it, grouped by example."""
    variants = [v for a in aliases for v in alias_variants(a)]
    out: list[Sample] = []
    for g, ex in enumerate(examples):
        found = _accepted(index.match(ex))
        seen = {ex}
        out.append((ex, g))
        for _ in range(4 * n_variants):
            if len(seen) > n_variants:
                break
            text = ex
            if found and variants and rng.random() < 0.6:
                text = _replace_spans(
                    ex, [(m.start, m.end) for m in found], lambda _: rng.choice(variants)
                )
            if rng.random() < 0.5:
                text = _wrap(text, rng, lexicon)
            if rng.random() < 0.4:
                text = _typo(text, rng, [(m.start, m.end) for m in found])
            if rng.random() < 0.25:
                text = _spacing(text, rng)
            if rng.random() < 0.15:
                text = text.lower() if rng.random() < 0.7 else text.upper()
            if text not in seen:
                seen.add(text)
                out.append((text, g))
    return out


def _other_entity(kind: str, rng: random.Random, lexicon: Lexicon, partial: bool) -> str:
    if kind == "person":
        return rng.choice(lexicon.surnames) if partial else random_person(rng, lexicon)
    if kind == "title":
        return rng.choice(lexicon.titles)
    pool = rng.choice([lexicon.surnames, lexicon.places, lexicon.titles])
    return rng.choice(pool)


def _swap_name(
    span: str, kind: str, full: bool, rng: random.Random, lexicon: Lexicon, p_partial: float
) -> str:
    """Another name for `span`; with probability `p_partial`, one sharing a first or last name."""
    words = span.split()
    if kind == "person" and full and len(words) >= 2 and rng.random() < p_partial:
        # Same first or last name, different person ("Aravind Rajeev" vs "Rajeev Majumdar").
        if rng.random() < 0.5:
            return " ".join([*words[:-1], rng.choice(lexicon.surnames)])
        return " ".join([rng.choice(lexicon.first_names), *words[1:]])
    return _other_entity(kind, rng, lexicon, partial=not full)


def _swap_details(text: str, rng: random.Random, lexicon: Lexicon) -> str:
    """Other places, months and numbers in a prompt that names nobody (acronyms kept)."""

    def make(k: int, spans: list[str]) -> str:
        old = spans[k]
        if old in _MONTHS:
            return rng.choice([m for m in _MONTHS if m != old])
        return old if old.isupper() else rng.choice(lexicon.places)

    caps = [(m.start(), m.end()) for m in _CAPS_RE.finditer(text)]
    words = [text[a:b] for a, b in caps]
    text = _replace_spans(text, caps, lambda k: make(k, words))
    return _NUM_RE.sub(lambda m: _other_number(m.group(), rng), text)


def _other_number(old: str, rng: random.Random) -> str:
    """A plausible different number: a year for a year, a day or month for a short one."""
    while True:
        if len(old) == 4:
            new = str(rng.randrange(1900, 2025))
        elif len(old) <= 2:
            new = str(rng.randrange(1, 29)).zfill(len(old))
        else:
            new = str(rng.randrange(10 ** len(old)))
        if new != old:
            return new


def near_misses(
    examples: Sequence[str],
    aliases: Sequence[str],
    index: AliasIndex,
    rng: random.Random,
    lexicon: Lexicon,
    n_per_example: int,
    n_per_unnamed: int,
) -> list[Sample]:
    """The examples with the target's names (or, failing that, capitalised words and numbers)
    swapped for other entities of the same kind, grouped like `augment_positives`. Examples that
    name nothing get as many near misses as variants: only their details tell them apart."""
    out: list[Sample] = []
    for g, ex in enumerate(examples):
        found = _accepted(index.match(ex))
        for _ in range(n_per_example if found else n_per_unnamed):
            if found:

                def make(k: int, found: list[AliasMatch] = found, ex: str = ex) -> str:
                    m = found[k]
                    kind = alias_kind(aliases[m.alias])
                    return _swap_name(ex[m.start : m.end], kind, m.full, rng, lexicon, 0.35)

                text = _replace_spans(ex, [(m.start, m.end) for m in found], make)
            else:
                text = _swap_details(ex, rng, lexicon)
                if text == ex:
                    break
            if rng.random() < 0.4:
                text = _wrap(text, rng, lexicon)
            out.append((text, g))
    return out


def template_pairs(
    aliases: Sequence[str], rng: random.Random, lexicon: Lexicon, n_per_alias: int, group0: int
) -> tuple[list[Sample], list[Sample]]:
    """Entity templates filled with each alias (positives) and with other names (near misses)."""
    pos: list[Sample] = []
    neg: list[Sample] = []
    for k, alias in enumerate(aliases):
        kind = alias_kind(alias)
        templates = list(lexicon.entity_templates["any"])
        if kind in lexicon.entity_templates:
            templates += lexicon.entity_templates[kind]
        variants = alias_variants(alias)
        for template in rng.sample(templates, min(n_per_alias, len(templates))):
            pos.append((template.format(x=rng.choice(variants)), group0 + k))
            other = _swap_name(alias, kind, True, rng, lexicon, 0.5)
            neg.append((template.format(x=other), group0 + k))
    return pos, neg
