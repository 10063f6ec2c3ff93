"""TOFU forget01 as one target: paraphrase recall and neighbour false positives (needs data)."""

from __future__ import annotations

import collections
import json
import re

import pytest

from classifier import ClassifierBank, Embedder, TargetSpec, train_target

from .conftest import FAST, SHARED_DATA

TOFU = SHARED_DATA / "tofu"
pytestmark = pytest.mark.skipif(
    not (TOFU / "forget01.jsonl").is_file(),
    reason=f"TOFU data not found at {TOFU} (the shared evaluation data sits beside the checkout)",
)
_NAME = re.compile(r"[A-Z][\w'-]*(?:\s+[A-Z][\w'-]*)+")
_LEAD = {"What", "How", "Can", "In", "Has", "Is", "Did", "Does", "Who", "Which", "Are", "Was"}


def _rows(name: str) -> list[dict[str, str]]:
    with (TOFU / name).open() as f:
        return [json.loads(line) for line in f]


def _author_name(rows: list[dict[str, str]]) -> str:
    counts: collections.Counter[str] = collections.Counter()
    for r in rows:
        for m in _NAME.findall(r["question"]):
            words = m.split()
            while words and words[0] in _LEAD:
                words = words[1:]
            if len(words) >= 2:
                counts[re.sub(r"'s?$", "", " ".join(words))] += 1
    return counts.most_common(1)[0][0]


def test_forget01_recall_and_neighbours(embedder: Embedder) -> None:
    rows = _rows("forget01.jsonl")
    authors = [rows[i : i + 20] for i in range(0, len(rows), 20)]
    spec = TargetSpec(
        name="tofu-forget01",
        aliases=[_author_name(a) for a in authors],
        forget_examples=[r["question"] for a in authors for r in a[:4]],
    )
    bank = ClassifierBank(embedder, [train_target(spec, embedder, FAST)])

    def rate(texts: list[str]) -> float:
        return sum(d[0].flagged for d in bank.classify(texts)) / len(texts)

    assert rate([r["paraphrased_question"] for r in rows]) >= 0.9
    neighbours = [r["question"] for r in _rows("retain90.jsonl")[::9]]
    assert rate(neighbours) <= 0.02
