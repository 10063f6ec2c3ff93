"""The static stage's token ids: word by word from a cache, the same as the tokenizer's."""

from __future__ import annotations

import json

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from classifier import Embedder
from classifier.embed import _WordPieces
from classifier.negatives import general_negatives

# Printable ASCII and what BERT's cleaning treats apart: control characters, special tokens
# (whole, in any case), a word longer than WordPiece's 100 characters, Unicode.
PARTS = st.sampled_from(
    [
        "Who",
        "wrote",
        "HARRY",
        "Potter's",
        "J.K.",
        "Rowling",
        "unbelievably",
        "0-6250",
        "1997",
        "@",
        "$5",
        "_",
        "`",
        "~",
        "\\\\",
        " ",
        "  ",
        "\t",
        "\n",
        "\r",
        "\x0b",
        "\x0c",
        "\x00",
        "\x7f",
        "[MASK]",
        "[cls]",
        "[SEP]",
        "x" * 101,
        "é",
        "Ｈａｒｒｙ",
        "\u200b",
    ]  # fmt: skip
)
TEXTS = st.one_of(
    st.lists(PARTS, max_size=25).map("".join),
    st.text(st.characters(min_codepoint=0, max_codepoint=127), max_size=120),
    st.text(max_size=60),
)


def _reference(tokenizer: Tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False).ids[:256])


@settings(max_examples=600, deadline=None)
@given(text=TEXTS)
@example("Tell me about [MASK] and [unk].")
@example("ab\x01cd")  # cleaning removes the control character: one word
def test_word_by_word_ids_are_the_tokenizers(embedder: Embedder, text: str) -> None:
    assert embedder.token_ids([text], pool=False)[0].tolist() == _reference(embedder._fast, text)


def test_the_shipped_negatives_read_the_same(embedder: Embedder) -> None:
    texts = list(general_negatives().texts)
    got = embedder.token_ids(texts, pool=False)
    assert [row.tolist() for row in got] == [_reference(embedder._fast, t) for t in texts]


def test_a_seen_prompt_is_read_from_the_word_cache(
    embedder: Embedder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tokenizer's own call costs ~35 us a text, most of it before WordPiece runs: a
    printable-ASCII prompt whose words were all seen before does not call it."""
    real = embedder._fast
    calls: list[str] = []

    class Counting:
        def encode(self, text: str, **kw: object) -> object:
            calls.append(text)
            return real.encode(text, **kw)

        def to_str(self) -> str:
            return real.to_str()

    monkeypatch.setattr(embedder, "_fast", Counting())
    monkeypatch.setattr(embedder, "_pieces", _WordPieces.of(Counting()))  # type: ignore[arg-type]
    text = "Tell me about the water cycle. Keep it short for reader 0-6250."
    assert embedder.token_ids([text], pool=False)[0].tolist() == _reference(real, text)
    assert len(calls) == len(set(calls)) == 15  # word by word, "." once
    calls.clear()
    again = "Keep it short for reader 0-6250. Tell me about the water cycle."
    assert embedder.token_ids([again], pool=False)[0].tolist() == _reference(real, again)
    assert calls == []


def test_a_wordpiece_tokenizer_without_special_tokens_reads_the_same(embedder: Embedder) -> None:
    config = json.loads(embedder._fast.to_str())
    config["added_tokens"] = []
    bare = Tokenizer.from_str(json.dumps(config))
    pieces = _WordPieces.of(bare)
    assert pieces is not None
    for text in ["Who wrote Harry Potter, in 1997?", "[MASK] and [CLS]", "a_b~c", ""]:
        assert pieces.ids(text) == _reference(bare, text)


def test_static_embeddings_of_a_batch_are_each_texts_own(embedder: Embedder) -> None:
    """Batches of more than a few texts take one `embedding_bag`; each row is still the mean
    of that text's own input embeddings, L2-normalised (zeros for a text without pieces), as
    when it is read alone."""
    import numpy as np

    texts = [*general_negatives().texts[:40], "", "Who is Harry Potter?", "a"]
    ids = embedder.token_ids(texts)
    batch = embedder.static_from_ids(ids)
    table = embedder._static
    for i, row in enumerate(ids):
        mean = table[row].mean(axis=0) if len(row) else np.zeros(embedder.dim, np.float32)
        want = mean / max(float(np.linalg.norm(mean)), 1e-12)
        np.testing.assert_allclose(batch[i], want, rtol=0, atol=1e-6)
        np.testing.assert_allclose(embedder.static_from_ids([row])[0], want, rtol=0, atol=1e-6)
    assert not batch[texts.index("")].any()
