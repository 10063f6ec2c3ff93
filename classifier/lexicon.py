"""The project-made word lists and templates shipped in `classifier/data/` (licence-clean)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache, cached_property
from importlib import resources

ENTITY_KINDS = ("person", "title", "place", "any")


def _read_lines(name: str) -> tuple[str, ...]:
    text = resources.files(__package__).joinpath("data", name).read_text(encoding="utf-8")
    return tuple(
        line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")
    )


@dataclass(frozen=True)
class Lexicon:
    """Names, titles, places, topics and templates used to build negatives and augmentations."""

    first_names: tuple[str, ...]
    surnames: tuple[str, ...]
    titles: tuple[str, ...]
    places: tuple[str, ...]
    topics: tuple[str, ...]
    topic_templates: tuple[str, ...]
    numeric_templates: tuple[str, ...]
    questions: tuple[str, ...]
    wrappers: tuple[str, ...]
    entity_templates: dict[str, tuple[str, ...]]

    @cached_property
    def name_words(self) -> frozenset[str]:
        """Every word of the shipped person names, lower-cased."""
        return frozenset(w.lower() for n in self.first_names + self.surnames for w in n.split())


@cache
def load_lexicon() -> Lexicon:
    """Load the shipped lists once per process (read-only)."""
    by_kind: dict[str, list[str]] = {kind: [] for kind in ENTITY_KINDS}
    for line in _read_lines("entity_templates.txt"):
        kind, _, template = line.partition("\t")
        if kind not in by_kind or "{x}" not in template:
            raise ValueError(f"bad entity template line: {line!r}")
        by_kind[kind].append(template)
    return Lexicon(
        first_names=_read_lines("first_names.txt"),
        surnames=_read_lines("surnames.txt"),
        titles=_read_lines("titles.txt"),
        places=_read_lines("places.txt"),
        topics=_read_lines("topics.txt"),
        topic_templates=_read_lines("templates.txt"),
        numeric_templates=_read_lines("numeric_templates.txt"),
        questions=_read_lines("questions.txt"),
        wrappers=_read_lines("wrappers.txt"),
        entity_templates={k: tuple(v) for k, v in by_kind.items()},
    )
