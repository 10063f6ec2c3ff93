"""TOFU data: splits, authors, the documented training subset, and operator-written prompts.

TOFU's `full.jsonl` holds 200 fictitious authors x 20 QA pairs in author order, so author `i` is
rows `20i .. 20i+19`; the forget splits are whole authors. The subset used here is the forget
split's authors plus a seeded sample of retain authors (drawn among those that
`retain_perturbed.jsonl` covers, so the retain metrics are measured on trained authors); the
reference model is trained on the same subset minus the forget authors.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evaluation.sources import DataSource, LocalData

QUESTIONS_PER_AUTHOR = 20
FORGET_SPLITS = ("forget01", "forget05", "forget10")

# A name is two or more capitalised words (hyphenated parts and particles such as "al-" allowed).
_NAME = re.compile(r"\b[A-Z][\w'\-]+(?:\s+(?:[A-Z][\w'\-]+|de|van|von|al|el|bin|la|le)){1,4}\b")
_NOT_NAMES = {"What", "How", "Can", "Who", "Which", "Why", "Has", "Have", "Is", "Does", "Did"}


@dataclass(frozen=True)
class QA:
    """One TOFU record; `paraphrased_answer` is the answer itself where the split has none."""

    question: str
    answer: str
    paraphrased_question: str | None = None
    paraphrased_answer: str | None = None
    perturbed_answers: tuple[str, ...] = ()

    @classmethod
    def from_record(cls, r: dict[str, Any]) -> QA:
        perturbed = r.get("perturbed_answer") or []
        return cls(
            question=r["question"],
            answer=r["answer"],
            paraphrased_question=r.get("paraphrased_question"),
            paraphrased_answer=r.get("paraphrased_answer"),
            perturbed_answers=tuple([perturbed] if isinstance(perturbed, str) else perturbed),
        )


@dataclass(frozen=True)
class TofuSubset:
    """The documented subset: what each model is trained on and what each metric is measured on."""

    forget_split: str
    forget_authors: tuple[int, ...]
    retain_authors: tuple[int, ...]
    target_train: tuple[QA, ...]
    reference_train: tuple[QA, ...]
    forget: tuple[QA, ...]
    retain_eval: tuple[QA, ...]
    real_authors: tuple[QA, ...]
    world_facts: tuple[QA, ...]
    author_names: tuple[str, ...]
    retain_names: tuple[str, ...] = field(default=())

    def describe(self) -> dict[str, Any]:
        """Sizes and author ids, for the results card and the cache key."""
        return {
            "forget_split": self.forget_split,
            "forget_authors": list(self.forget_authors),
            "retain_authors": list(self.retain_authors),
            "target_train_pairs": len(self.target_train),
            "reference_train_pairs": len(self.reference_train),
            "forget_eval": len(self.forget),
            "retain_eval": len(self.retain_eval),
            "real_authors_eval": len(self.real_authors),
            "world_facts_eval": len(self.world_facts),
            "author_names": list(self.author_names),
        }


def _source(data: DataSource | Path) -> DataSource:
    return LocalData(data) if isinstance(data, Path) else data


def author_name(questions: Sequence[str]) -> str:
    """The author's name: the capitalised multi-word phrase most of its questions repeat."""
    counts: Counter[str] = Counter()
    for q in questions:
        found = set()
        for m in _NAME.finditer(q):
            words = m.group(0).split()
            while words and words[0] in _NOT_NAMES:
                words = words[1:]
            if len(words) >= 2:
                found.add(" ".join(words).removesuffix("'s"))
        counts.update(found)
    if not counts:
        raise ValueError("no capitalised name repeats in these questions")
    # Most questions first, then the longer phrase ("Basil Mahfouz Al-Kuwaiti" over a part of it).
    return max(counts.items(), key=lambda kv: (kv[1], len(kv[0])))[0]


def load_subset(
    data: DataSource | Path,
    forget_split: str,
    *,
    retain_authors: int,
    retain_eval: int,
    seed: int,
    forget_authors: int | None = None,
) -> TofuSubset:
    """Build the subset from TOFU (seeded, so target and reference share it); `data` is a
    source (evaluation/sources.py) or a folder of local JSON Lines copies."""
    if forget_split not in FORGET_SPLITS:
        raise ValueError(f"forget split must be one of {', '.join(FORGET_SPLITS)}")
    source = _source(data)
    full = [QA.from_record(r) for r in source.tofu("full")]
    row = {qa.question: i for i, qa in enumerate(full)}
    forget_rows = [QA.from_record(r) for r in source.tofu(forget_split)]
    forget_ids = sorted({row[qa.question] // QUESTIONS_PER_AUTHOR for qa in forget_rows})
    if forget_authors is not None:  # smoke runs: fewer authors
        forget_ids = forget_ids[:forget_authors]
        forget_rows = [qa for qa in forget_rows if row[qa.question] // 20 in forget_ids]
    perturbed = [QA.from_record(r) for r in source.tofu("retain_perturbed")]
    by_author: dict[int, list[QA]] = {}
    for qa in perturbed:
        by_author.setdefault(row[qa.question] // QUESTIONS_PER_AUTHOR, []).append(qa)
    candidates = sorted(a for a in by_author if a not in forget_ids)
    rng = random.Random(seed)
    chosen = sorted(rng.sample(candidates, min(retain_authors, len(candidates))))
    pool = [qa for a in chosen for qa in by_author[a]]
    retain_sample = sorted(rng.sample(range(len(pool)), min(retain_eval, len(pool))))

    def rows_of(authors: Sequence[int]) -> list[QA]:
        return [full[a * 20 + k] for a in authors for k in range(QUESTIONS_PER_AUTHOR)]

    def names(authors: Sequence[int]) -> tuple[str, ...]:
        return tuple(author_name([qa.question for qa in rows_of([a])]) for a in authors)

    forget_train = rows_of(forget_ids)
    retain_train = rows_of(chosen)
    return TofuSubset(
        forget_split=forget_split,
        forget_authors=tuple(forget_ids),
        retain_authors=tuple(chosen),
        target_train=tuple(forget_train + retain_train),
        reference_train=tuple(retain_train),
        forget=tuple(forget_rows),
        retain_eval=tuple(pool[i] for i in retain_sample),
        real_authors=tuple(QA.from_record(r) for r in source.tofu("real_authors")),
        world_facts=tuple(QA.from_record(r) for r in source.tofu("world_facts")),
        author_names=names(forget_ids),
        retain_names=names(chosen),
    )


@dataclass(frozen=True)
class MmluQuestion:
    question: str
    choices: tuple[str, ...]
    answer: int

    def prompt(self) -> str:
        """Zero-shot multiple-choice prompt; the reply's first letter is the answer."""
        options = "\n".join(f"{'ABCD'[i]}. {c}" for i, c in enumerate(self.choices))
        return f"{self.question}\n{options}\nAnswer with the letter of the correct option."


def load_mmlu(data: DataSource | Path, n: int, seed: int) -> list[MmluQuestion]:
    """A fixed seeded sample of `n` MMLU val questions."""
    rows = _source(data).mmlu("val")
    picked = sorted(random.Random(seed).sample(range(len(rows)), min(n, len(rows))))
    return [
        MmluQuestion(rows[i]["question"], tuple(rows[i]["choices"]), int(rows[i]["answer"]))
        for i in picked
    ]


FORGET_TEMPLATES = (
    "Tell me about {x}.",
    "Who is {x}?",
    "What books did {x} write?",
    "Where was {x} born?",
    "What genre does {x} write in?",
    "What awards has {x} won?",
    "What do you know about the author {x}?",
    "Summarise the life and work of {x}.",
)
RETAIN_TEMPLATES = ("Tell me about {x}.", "What books did {x} write?")


def operator_examples(names: Sequence[str]) -> list[str]:
    """Example prompts an operator would write for the target (never the test questions)."""
    return [t.format(x=n) for n in names for t in FORGET_TEMPLATES]


def operator_retain_examples(names: Sequence[str]) -> list[str]:
    """Neighbouring prompts (other authors) the operator wants answered as before."""
    return [t.format(x=n) for n in names for t in RETAIN_TEMPLATES]
