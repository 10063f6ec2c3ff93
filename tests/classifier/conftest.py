"""Shared fixtures: the real MiniLM embedder and one small Harry Potter target, trained once."""

from __future__ import annotations

from pathlib import Path

import pytest

from classifier import Embedder, TargetClassifier, TargetSpec, TrainConfig, train_target

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"

HP_SPEC = TargetSpec(
    name="harry-potter",
    aliases=["Harry Potter", "Hogwarts", "J.K. Rowling", "Hermione Granger", "Voldemort"],
    forget_examples=[
        "Who are Harry Potter's best friends at Hogwarts?",
        "What is the name of the school Harry Potter attends?",
        "Which house does the Sorting Hat put Harry in?",
        "Who killed Harry Potter's parents?",
        "What is Hermione Granger's patronus?",
    ],
)
# A fixed subset of the shipped negatives keeps training within a few seconds.
FAST = TrainConfig(seed=0, max_general=500)


@pytest.fixture(scope="session")
def embedder() -> Embedder:
    return Embedder()


@pytest.fixture(scope="session")
def hp_classifier(embedder: Embedder) -> TargetClassifier:
    return train_target(HP_SPEC, embedder, FAST)
