"""The bank: two stages, conversations, spans, and atomic swaps of the active set."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Sequence

import numpy as np
import pytest

from classifier import ClassifierBank, Embedder, TargetClassifier


def test_decisions_per_text_and_target(hp_classifier: TargetClassifier, embedder: Embedder) -> None:
    other = dataclasses.replace(hp_classifier, name="other")
    bank = ClassifierBank(embedder, [hp_classifier, other])
    texts = ["Who is Harry Potter?", "What is the capital of France?"]
    out = bank.classify(texts)
    assert [[d.target for d in ds] for ds in out] == [["harry-potter", "other"]] * 2
    hp, general = out[0][0], out[1][0]
    assert hp.flagged and hp.stage == "alias"  # named in full: MiniLM is not asked
    assert texts[0][slice(*hp.spans[0])] == "Harry Potter"
    assert not general.flagged and general.spans == ()
    assert ClassifierBank(embedder).classify(texts) == [[], []]


def test_a_target_named_in_full_is_flagged_without_minilm(
    hp_classifier: TargetClassifier, embedder: Embedder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A prompt naming a target in full is flagged whatever stage 2 says, so MiniLM does not
    read it for that target: it settles on the event loop (`settled_groups`). MiniLM still reads
    it for any other target whose gate it passes, and for a target named in part."""
    encoded: list[list[str]] = []
    encode = embedder.encode
    monkeypatch.setattr(
        embedder, "encode", lambda texts, *a: encoded.append(list(texts)) or encode(texts, *a)
    )
    named = "Tell me about Harry Potter and the water cycle."
    partly = "Which house was Harry sorted into?"
    bank = ClassifierBank(embedder, [hp_classifier], cache_size=0)
    settled = bank.settled_groups([[named]])[0]
    assert settled is not None and [(d.flagged, d.stage) for d in settled] == [(True, "alias")]
    [decision] = bank.classify([named])[0]
    assert decision.flagged and decision.stage == "alias" and not encoded
    assert bank.settled_groups([[partly]]) == [None]
    assert bank.classify([partly])[0][0].stage == "full" and encoded == [[partly]]
    # A second target whose gate every text passes (the same heads, no aliases).
    other = dataclasses.replace(
        hp_classifier, name="books", aliases=(), alias_flags=(), gate_logit=-50.0
    )
    encoded.clear()
    hp, books = ClassifierBank(embedder, [hp_classifier, other], cache_size=0).classify([named])[0]
    assert (hp.stage, books.stage) == ("alias", "full") and encoded == [[named]]


def test_follow_up_turn_stays_flagged(hp_classifier: TargetClassifier, embedder: Embedder) -> None:
    bank = ClassifierBank(embedder, [hp_classifier])
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Tell me about Hermione Granger."},
        {"role": "assistant", "content": "She is a character in a series of novels."},
        {"role": "user", "content": [{"type": "text", "text": "and when was she born?"}]},
    ]
    assert bank.classify_messages(messages)[0].flagged
    assert not bank.classify_messages(messages[-1:])[0].flagged


def test_long_conversation_is_classified_everywhere(
    hp_classifier: TargetClassifier, embedder: Embedder
) -> None:
    bank = ClassifierBank(embedder, [hp_classifier])
    filler = "Please follow the style guide carefully. " * 60  # far beyond MiniLM's window
    text = filler + "\nWho are Harry Potter's friends?"
    decision = bank.classify([text])[0][0]
    assert decision.flagged
    assert text[slice(*decision.spans[0])] == "Harry Potter"


def test_add_remove_and_embedder_check(hp_classifier: TargetClassifier, embedder: Embedder) -> None:
    bank = ClassifierBank(embedder)
    bank.add(hp_classifier)
    bank.add(hp_classifier)  # same name: replaced, not duplicated
    assert [t.name for t in bank.targets] == ["harry-potter"]
    assert bank.remove("harry-potter") and not bank.remove("harry-potter")
    foreign = dataclasses.replace(hp_classifier, embedder_fingerprint="elsewhere")
    with pytest.raises(ValueError, match="embedder"):
        bank.add(foreign)
    with pytest.raises(ValueError, match="duplicate"):
        bank.set_targets([hp_classifier, hp_classifier])


def test_swaps_are_atomic(hp_classifier: TargetClassifier, embedder: Embedder) -> None:
    set_a = [dataclasses.replace(hp_classifier, name=f"a{i}") for i in range(3)]
    set_b = [dataclasses.replace(hp_classifier, name=f"b{i}") for i in range(2)]
    names_a, names_b = [t.name for t in set_a], [t.name for t in set_b]
    bank = ClassifierBank(embedder, set_a)
    seen: list[list[str]] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            seen.append([d.target for d in bank.classify(["What is the capital of Peru?"])[0]])

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for i in range(100):
        bank.set_targets(set_b if i % 2 == 0 else set_a)
    stop.set()
    for t in threads:
        t.join()
    assert seen
    assert all(names in (names_a, names_b) for names in seen)


class _Reads:
    """Counts the texts the bank tokenizes (every text it classifies afresh is)."""

    def __init__(self, embedder: Embedder, monkeypatch: pytest.MonkeyPatch) -> None:
        self.texts: list[str] = []
        token_ids = embedder.token_ids

        def counting(texts: Sequence[str], *, pool: bool = True) -> list[np.ndarray]:
            self.texts += texts
            return token_ids(texts, pool=pool)

        monkeypatch.setattr(embedder, "token_ids", counting)


def test_cached_texts_are_not_classified_again(
    hp_classifier: TargetClassifier, embedder: Embedder, monkeypatch: pytest.MonkeyPatch
) -> None:
    bank = ClassifierBank(embedder, [hp_classifier])
    reads = _Reads(embedder, monkeypatch)
    system, question = "You are a helpful assistant.", "Who wrote Harry Potter?"
    first = bank.classify_groups([[system + "\n" + question, system, question]])
    assert len(reads.texts) == 3 and first[0][0].flagged
    reads.texts.clear()
    follow_up = "And when was it published?"
    joined = system + "\n" + question + "\n" + follow_up
    again = bank.classify_groups([[joined, system, question, follow_up], [question]])
    assert reads.texts == [joined, follow_up]  # the earlier turns come from the cache
    assert again[1] == bank.classify([question])[0]
    assert again[0][0].flagged and again[0][0].spans == first[0][0].spans

    uncached = ClassifierBank(embedder, [hp_classifier], cache_size=0)
    reads.texts.clear()
    uncached.classify_groups([[question]])
    uncached.classify_groups([[question]])
    assert reads.texts == [question, question]


def test_the_cache_is_bounded(
    hp_classifier: TargetClassifier, embedder: Embedder, monkeypatch: pytest.MonkeyPatch
) -> None:
    bank = ClassifierBank(embedder, [hp_classifier], cache_size=3)
    reads = _Reads(embedder, monkeypatch)
    texts = [f"What is {n} plus {n}?" for n in range(10)]
    for text in texts:
        bank.classify([text])
    reads.texts.clear()
    bank.classify(texts[-3:])  # the last three are kept
    assert reads.texts == []
    bank.classify(texts[:1])  # the first was dropped
    assert reads.texts == texts[:1]


def test_the_cache_follows_the_active_targets(
    hp_classifier: TargetClassifier, embedder: Embedder, monkeypatch: pytest.MonkeyPatch
) -> None:
    bank = ClassifierBank(embedder, [hp_classifier])
    reads = _Reads(embedder, monkeypatch)
    text = "Who wrote Harry Potter?"
    assert [d.target for d in bank.classify_all([text])] == ["harry-potter"]
    relaxed = dataclasses.replace(hp_classifier, name="relaxed", threshold_logit=50.0)
    relaxed = dataclasses.replace(relaxed, alias_flags=(False,) * len(relaxed.aliases))
    bank.set_targets([relaxed])
    (decision,) = bank.classify_all([text])
    assert (decision.target, decision.flagged) == ("relaxed", False)
    bank.add(hp_classifier)
    assert [(d.target, d.flagged) for d in bank.classify_all([text])] == [
        ("relaxed", False),
        ("harry-potter", True),
    ]
    bank.remove("relaxed")
    assert [d.target for d in bank.classify_all([text])] == ["harry-potter"]
    assert reads.texts == [text] * 4  # classified afresh after every change
