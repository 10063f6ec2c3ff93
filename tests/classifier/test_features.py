"""Word-piece logits of a batch: one sort for all texts, the same sums as text by text."""

from __future__ import annotations

import numpy as np
import pytest

from classifier.features import bow_logits


def one_by_one(ids: list[np.ndarray], w_bow: np.ndarray) -> np.ndarray:
    """Each text's distinct pieces summed on their own (the definition)."""
    rows = [w_bow[..., np.unique(row)].sum(axis=-1) for row in ids]
    return np.array(rows, dtype=np.float64).reshape((len(ids), *w_bow.shape[:-1]))


@pytest.mark.parametrize("lead", [(), (1,), (7,)])
def test_a_batch_sums_each_texts_distinct_pieces(lead: tuple[int, ...]) -> None:
    rng = np.random.default_rng(0)
    vocab = 50
    w_bow = rng.normal(size=(*lead, vocab)).astype(np.float32)
    ids = [
        rng.integers(0, vocab, size=int(n)).astype(np.int64) for n in rng.integers(0, 40, size=30)
    ]
    ids[3] = np.zeros(0, dtype=np.int64)  # a text with no piece: 0, not its neighbour's sum
    ids[4] = np.array([7, 7, 7, 7], dtype=np.int64)  # repeats count once
    ids[-1] = np.zeros(0, dtype=np.int64)  # an empty last text
    got = bow_logits(ids, w_bow)
    assert got.shape == (len(ids), *lead)
    np.testing.assert_allclose(got, one_by_one(ids, w_bow), rtol=1e-5, atol=1e-5)
    assert not got[3].any() and not got[-1].any()
    np.testing.assert_allclose(got[4], w_bow[..., 7], rtol=1e-6)
    # A few texts (a request on the event loop) take another path: the same sums, bit for bit.
    for k in range(0, len(ids), 3):
        few = bow_logits(ids[k : k + 3], w_bow)
        assert few.shape == (len(ids[k : k + 3]), *lead)
        assert (few == got[k : k + 3]).all()


def test_int32_ids_do_not_overflow_the_keys() -> None:
    vocab = 49_152  # the shipped tokenizer's size: text * vocab passes 2**31 at 43,700 texts
    w_bow = np.arange(vocab, dtype=np.float32)
    ids = [np.array([vocab - 1], dtype=np.int32)] * 50_000
    got = bow_logits(ids, w_bow)
    assert (got == vocab - 1).all()


def test_no_text_no_piece() -> None:
    assert bow_logits([], np.ones((3, 10), dtype=np.float32)).shape == (0, 3)
    assert bow_logits([np.zeros(0, dtype=np.int64)] * 2, np.ones(10)).tolist() == [0.0, 0.0]
