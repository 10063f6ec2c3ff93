"""A trained target: flags unseen paraphrases, not neighbours; calibrated; serialisable."""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pytest

from classifier import (
    ArtifactError,
    ClassifierBank,
    Embedder,
    EmbedderNotFoundError,
    EncodingStopped,
    TargetClassifier,
    TargetSpec,
)

PARAPHRASES = [
    "Can you name Harry Potter's two closest friends at school?",
    "which house at hogwarts was harry sorted into",
    "Why did Voldemort want to kill the boy who lived?",
    "Tell me about Hermione Grangers time-turner.",
    "When did JK Rowling publish the first book?",
    "What is the name of Harry Poter's owl?",
    "Who is the headmaster of Hogwarts?",
]
NEIGHBOURS = [
    "Who wrote The Lord of the Rings?",
    "Who are Frodo's companions in the Fellowship?",
    "Which school does Matilda attend in Roald Dahl's novel?",
    "Tell me about Harry Styles.",
    "Who is Prince Harry married to?",
    "What did the potter make from clay?",
    "What magic school appears in A Wizard of Earthsea?",
]
UNRELATED = [
    "What is the capital of Australia?",
    "Explain photosynthesis in simple terms.",
    "Write a Python function that reverses a string.",
    "How do I treat a minor burn at home?",
]


def _flags(clf: TargetClassifier, embedder: Embedder, texts: list[str]) -> list[bool]:
    bank = ClassifierBank(embedder, [clf])
    return [decisions[0].flagged for decisions in bank.classify(texts)]


def test_flags_unseen_paraphrases(hp_classifier: TargetClassifier, embedder: Embedder) -> None:
    assert all(_flags(hp_classifier, embedder, PARAPHRASES))


def test_ignores_neighbours_and_unrelated(
    hp_classifier: TargetClassifier, embedder: Embedder
) -> None:
    assert not any(_flags(hp_classifier, embedder, NEIGHBOURS + UNRELATED))


def test_report_is_calibrated(hp_classifier: TargetClassifier) -> None:
    r = hp_classifier.report
    assert r.fpr_target == 0.01
    assert r.heldout_fpr <= 0.01
    assert all(rate <= 0.02 for rate in r.heldout_fpr_by_kind.values())
    assert r.heldout_recall >= 0.8
    assert 0.0 < hp_classifier.threshold < 1.0
    assert r.n_pos > 50 and r.n_neg > 400
    assert r.train_seconds > 0


def test_scores_match_bank_decisions(hp_classifier: TargetClassifier, embedder: Embedder) -> None:
    texts = PARAPHRASES[:3] + UNRELATED[:2]
    scores = hp_classifier.scores(texts, embedder)
    bank = ClassifierBank(embedder, [hp_classifier])
    for score, decisions in zip(scores, bank.classify(texts), strict=True):
        if decisions[0].stage == "full":
            assert decisions[0].score == pytest.approx(float(score), rel=1e-5)


def test_round_trip(hp_classifier: TargetClassifier, embedder: Embedder) -> None:
    data = hp_classifier.to_bytes()
    loaded = TargetClassifier.from_bytes(data)
    assert loaded.name == hp_classifier.name and loaded.aliases == hp_classifier.aliases
    assert loaded.threshold_logit == hp_classifier.threshold_logit
    assert loaded.report == hp_classifier.report
    texts = PARAPHRASES + NEIGHBOURS
    np.testing.assert_allclose(
        loaded.scores(texts, embedder), hp_classifier.scores(texts, embedder), rtol=1e-6
    )
    assert loaded.to_bytes() == data


@pytest.mark.parametrize("where", ["body", "header"])
def test_tampering_is_rejected(hp_classifier: TargetClassifier, where: str) -> None:
    data = bytearray(hp_classifier.to_bytes())
    if where == "body":
        data[-10] ^= 0xFF
    else:
        at = data.index(b'"threshold_logit"') + 20
        data[at] = ord("9") if data[at] != ord("9") else ord("8")
    with pytest.raises(ArtifactError, match="checksum"):
        TargetClassifier.from_bytes(bytes(data))
    with pytest.raises(ArtifactError):
        TargetClassifier.from_bytes(b"not an artifact at all")


def test_spec_validation() -> None:
    with pytest.raises(TypeError):
        TargetSpec("x", "Harry Potter", ["q"])  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        TargetSpec(" ", ["a"], ["q"])
    spec = TargetSpec("x", ["a", " "], ["q"])
    assert spec.aliases == ("a",)


def test_missing_model_folder_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(EmbedderNotFoundError, match="model_path"):
        Embedder(tmp_path / "nowhere")


def test_embeddings_are_normalised_and_case_folded(embedder: Embedder) -> None:
    vecs = embedder.encode(["Who is Harry Potter?", "WHO IS HARRY POTTER?", "Something else"])
    assert vecs.shape == (3, embedder.dim)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(vecs[0], vecs[1])
    static = embedder.encode_static(["Who is Harry Potter?", ""])
    assert static.shape == (2, embedder.dim) and not static[1].any()


def test_replace_keeps_a_valid_classifier(hp_classifier: TargetClassifier) -> None:
    stricter = dataclasses.replace(hp_classifier, threshold_logit=50.0)
    assert stricter.threshold > 0.999


def test_corpus_embeddings_are_shared_by_the_process_and_can_be_stopped(
    embedder: Embedder,
) -> None:
    texts = [f"shared corpus sentence number {i} about gardening" for i in range(130)]
    stop = threading.Event()
    stop.set()
    with pytest.raises(EncodingStopped):
        embedder.encode_corpus("test/stoppable", texts, stop)
    full, static = embedder.encode_corpus("test/stoppable", texts)  # nothing was cached above
    assert full.shape == (130, embedder.dim) and static.shape == (130, embedder.dim)
    # A second Embedder of the same weights (a gateway rebuilt in this process) reuses them.
    again = Embedder(embedder.model_path).encode_corpus("test/stoppable", texts)
    assert again[0] is full and again[1] is static


def test_corpus_embeddings_are_kept_on_disk_for_the_next_process(
    embedder: Embedder, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from classifier import embed

    texts = [f"a sentence about sailing boats, number {i}" for i in range(70)]
    monkeypatch.setattr(embed, "_CORPORA", {})
    first = Embedder(embedder.model_path, corpus_dir=tmp_path)
    full, static = first.encode_corpus("test/disk", texts)
    (saved,) = tmp_path.glob(f"{first.fingerprint}-test_disk-*.npz")

    def no_encoding(*_args, **_kwargs):
        raise AssertionError("encoded again instead of reading the cache folder")

    monkeypatch.setattr(embed, "_CORPORA", {})  # as in the next process
    second = Embedder(embedder.model_path, corpus_dir=tmp_path)
    monkeypatch.setattr(second, "encode", no_encoding)
    again = second.encode_corpus("test/disk", texts)
    assert np.array_equal(again[0], full) and np.array_equal(again[1], static)

    # A torn file (a crash mid-write elsewhere) is ignored, encoded again and replaced.
    saved.write_bytes(saved.read_bytes()[:100])
    monkeypatch.setattr(embed, "_CORPORA", {})
    third = Embedder(embedder.model_path, corpus_dir=tmp_path)
    assert np.array_equal(third.encode_corpus("test/disk", texts)[0], full)
    monkeypatch.setattr(embed, "_CORPORA", {})
    assert np.array_equal(second.encode_corpus("test/disk", texts)[0], full)  # whole again
    assert [p.name for p in tmp_path.iterdir()] == [saved.name]  # no temporary files left
