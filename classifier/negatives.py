"""The shipped general question set: hand-written questions plus combinatorial templates."""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import cache

from .lexicon import Lexicon, load_lexicon

GENERAL = "general"
ENTITY = "entity"


@dataclass(frozen=True)
class NegativeSet:
    """Texts with their kind (`general` or `entity`: questions about other people/books/places)."""

    texts: tuple[str, ...]
    kinds: tuple[str, ...]


def random_person(rng: random.Random, lexicon: Lexicon) -> str:
    """A made-up full name: one given name and one or two family names."""
    first = rng.choice(lexicon.first_names)
    last = rng.choice(lexicon.surnames)
    if rng.random() < 0.2:
        return f"{first} {rng.choice(lexicon.surnames)} {last}"
    return f"{first} {last}"


def _topic_questions(rng: random.Random, lexicon: Lexicon, n: int) -> list[str]:
    out: set[str] = set()
    while len(out) < n:
        t, u = rng.sample(lexicon.topics, 2)
        template = rng.choice(lexicon.topic_templates)
        q = template.format(t=t, u=u)
        out.add(q[0].upper() + q[1:])
    return sorted(out)


_MONTHS = (
    "January February March April May June July August September October November December"
).split()


def _numeric_questions(rng: random.Random, lexicon: Lexicon, n: int) -> list[str]:
    out: set[str] = set()
    while len(out) < n:
        out.add(
            rng.choice(lexicon.numeric_templates).format(
                a=rng.randrange(2, 13),
                b=rng.randrange(2, 60),
                c=rng.randrange(2, 30),
                n=rng.randrange(20, 5000),
                year=rng.randrange(1800, 2025),
                month=rng.choice(_MONTHS),
                day=rng.randrange(1, 29),
            )
        )
    return sorted(out)


def _entity_questions(rng: random.Random, lexicon: Lexicon, n_per_kind: int) -> list[str]:
    out: set[str] = set()
    pools = {"person": None, "title": lexicon.titles, "place": lexicon.places}
    for kind, pool in pools.items():
        templates = lexicon.entity_templates[kind] + lexicon.entity_templates["any"]
        target = len(out) + n_per_kind
        while len(out) < target:
            x = random_person(rng, lexicon) if pool is None else rng.choice(pool)
            q = rng.choice(templates).format(x=x)
            out.add(q[0].upper() + q[1:])
    return sorted(out)


@cache
def general_negatives(
    seed: int = 0, n_topic: int = 900, n_numeric: int = 250, n_entity: int = 250
) -> NegativeSet:
    """The deterministic shipped negative set (about 2,200 texts), cached per process."""
    lexicon = load_lexicon()
    rng = random.Random(seed)
    general = list(lexicon.questions) + _topic_questions(rng, lexicon, n_topic)
    general += _numeric_questions(rng, lexicon, n_numeric)
    entity = _entity_questions(rng, lexicon, n_entity)
    texts = tuple(general + entity)
    kinds = tuple([GENERAL] * len(general) + [ENTITY] * len(entity))
    return NegativeSet(texts, kinds)
