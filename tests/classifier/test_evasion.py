"""Obfuscated forget prompts: the normalised view, and recall per kind of obfuscation measured
by bench/evasion.py on a trained target (the strong kinds must stay above a floor)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from classifier import ClassifierBank, Embedder
from classifier.normalize import normalize

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from evasion import STRONG_KINDS, evaluate, load_cases, table, train_bank  # noqa: E402

KINDS = {
    "plain", "leetspeak", "spaced_punctuated", "homoglyph", "case", "misspelling",
    "french", "german", "spanish", "indirect",
}  # fmt: skip


@pytest.mark.parametrize(
    ("text", "view"),
    [
        ("H4rry P0tt3r", "Harry Potter"),
        ("Who is H.a.r.r.y P.o.t.t.e.r?", "Who is Harry Potter?"),
        ("H-a-r-r-y and H_o_g", "Harry and Hog"),
        ("about H a r r y  P o t t e r", "about Harry  Potter"),
        ("Наrrу Роttеr", "Harry Potter"),  # Cyrillic а р у о е
        ("Ηarry Ρotter", "Harry Potter"),  # Greek Eta and Rho
        ("Ｈａｒｒｙ", "Harry"),  # full-width
        ("Har\u200bry Pot\u200dter", "Harry Potter"),  # zero-width characters
        ("V0ld3m0rt", "Voldemort"),
    ],
)
def test_normalize_undoes_obfuscations(text: str, view: str):
    assert normalize(text) == view


@pytest.mark.parametrize(
    "text",
    [
        "How do volcanoes form?",
        "COVID-19 spread in 2020; MP3 players in the 1990s; the 3rd and 4th of May.",
        "Кто написал «Войну и мир»?",  # real Russian words stay Cyrillic
        "Qui a écrit Les Misérables ?",
        "Call 555-0100 at 9 am.",
    ],
)
def test_normalize_leaves_ordinary_text_alone(text: str):
    assert normalize(text) == text


@pytest.fixture(scope="module")
def bank(embedder: Embedder) -> ClassifierBank:
    return train_bank(embedder)


@pytest.fixture(scope="module")
def report(bank: ClassifierBank) -> dict:
    return evaluate(bank, load_cases())


def test_recall_is_reported_per_kind_and_strong_kinds_hold(report: dict):
    print(table(report))  # noqa: T201
    assert set(report["kinds"]) == KINDS
    for kind, figures in report["kinds"].items():
        assert figures["n"] >= 8 and 0.0 <= figures["recall"] <= 1.0, kind
    for kind in STRONG_KINDS:
        assert report["kinds"][kind]["recall"] >= 0.75, (kind, report["kinds"][kind]["missed"])
    # The normalised view is what catches these: without it they slip through.
    for kind in ("leetspeak", "spaced_punctuated", "homoglyph"):
        figures = report["kinds"][kind]
        assert figures["recall"] > figures["recall_without_normalisation"], kind
    weak = {k for k, v in report["kinds"].items() if v["recall"] < 0.75}
    assert set(report["weak_kinds"]) == weak  # the weak kinds are named
    assert report["benign_obfuscated"]["false_positives"] <= 1


def test_a_flagged_view_flags_the_text(bank: ClassifierBank):
    text = "Who are H.a.r.r.y P.o.t.t.e.r's best friends?"
    (with_view,) = bank.classify([text])
    (raw,) = bank.classify([text], normalized=False)
    assert with_view[0].flagged and not raw[0].flagged
    plain = "How do volcanoes form?"
    assert bank.classify([plain]) == bank.classify([plain], normalized=False)
