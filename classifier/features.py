"""Feature vectors shared by training and serving: embedding, alias and word-piece features.

A head's logit is `embedding . w_emb + alias_features . w_lex + sum of w_bow over the distinct
word pieces of the text + bias`: the dense embedding carries the meaning, the alias features
who is named, and the bag of word pieces the details (places, dates, titles) that a sentence
embedding blurs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import sparse

from .details import DetailIndex, text_terms
from .spans import AliasIndex, AliasMatch

# Lexical features per (text, target): full-match quality; specificity of a partial match on a
# person's last name, of another partial match; of a partial match next to another name; and
# the detail overlap with the target's examples that name nobody (see details.py).
N_LEXICAL = 5
FEATURE_VERSION = 4
Profiles = Sequence[tuple[str, ...]]  # one target's detail profiles


def lexical_features(matches: Sequence[AliasMatch], n_targets: int) -> np.ndarray:
    """(T, 5) lexical features of one text for each of `n_targets` targets (no details)."""
    out = np.zeros((n_targets, N_LEXICAL), dtype=np.float32)
    for m in matches:
        row = out[m.target]
        if m.full:
            row[0] = max(row[0], max(0.25, 1.0 - 0.25 * m.edits))
        elif m.conflict:
            row[3] = max(row[3], m.weight)
        elif m.surname:
            row[1] = max(row[1], m.weight)
        else:
            row[2] = max(row[2], m.weight)
    return out


FULL_NAME_MAX_EDITS = 1


def named_in_full(matches: Sequence[AliasMatch], target: int, flags: Callable[[int], bool]) -> bool:
    """Whether the text names one of `target`'s aliases in full (at most one typo), for an
    alias whose `flags(alias)` says that naming it flags a prompt by itself."""
    return any(
        m.target == target and m.full and m.edits <= FULL_NAME_MAX_EDITS and flags(m.alias)
        for m in matches
    )


def names_target(lex: np.ndarray) -> np.ndarray:
    """Whether lexical features (..., 5) show the target named (fully, or partly without a
    conflicting name): such prompts always go on to stage 2."""
    return np.asarray((lex[..., :3] > 0).any(axis=-1))


def add_details(lex: np.ndarray, text: str, index: DetailIndex) -> np.ndarray:
    """Fill the detail-overlap column of one text's (T, 5) features in place (each target's
    `detail_overlap`, through the index of all targets' profiles); returns it."""
    if index:
        for t, share in index.overlaps(text_terms(text)).items():
            lex[t, 4] = share
    return lex


def batch_lexical(
    index: AliasIndex, texts: Sequence[str], profiles: Sequence[Profiles] = ()
) -> tuple[np.ndarray, list[list[AliasMatch]]]:
    """(N, T, 5) lexical features for many texts, and the raw alias matches per text."""
    n_targets = len(index.aliases)
    matches = [index.match(t) for t in texts]
    if not texts:
        return np.zeros((0, n_targets, N_LEXICAL), dtype=np.float32), matches
    feats = [lexical_features(m, n_targets) for m in matches]
    if profiles:
        details = DetailIndex(profiles)
        feats = [add_details(f, t, details) for f, t in zip(feats, texts, strict=True)]
    return np.stack(feats), matches


def bag_of_pieces(ids: Sequence[np.ndarray], vocab_size: int) -> sparse.csr_matrix:
    """(N, V) binary presence of each word piece."""
    uniq = [np.unique(row) for row in ids]
    indptr = np.concatenate([[0], np.cumsum([len(u) for u in uniq])])
    indices = np.concatenate(uniq) if uniq else np.zeros(0, dtype=np.int64)
    data = np.ones(len(indices), dtype=np.float32)
    return sparse.csr_matrix((data, indices, indptr), shape=(len(ids), vocab_size))


def bow_logits(ids: Sequence[np.ndarray], w_bow: np.ndarray) -> np.ndarray:
    """Sum of `w_bow` (V,) or (T, V) over each text's distinct word pieces: (N,) or (N, T).

    One sort for the whole batch, not one per text: NumPy lets go of the GIL for every sort,
    and on the guard's thread each time it takes it back costs up to the interpreter's switch
    interval (5 ms) while the event loop is busy, as it is under a burst (a batch of 32 texts
    waited 0.7 s that way against a busy thread, bench/gil_contention.py)."""
    n, lead, vocab = len(ids), w_bow.shape[:-1], w_bow.shape[-1]
    out = np.zeros((*lead, n), dtype=np.float64)  # (..., N)
    if n <= 4:
        # A few texts (a request read on the event loop): a set each; the sort below has a
        # fixed cost of ~20 us however few the pieces. The same pieces in the same order.
        for k, row in enumerate(ids):
            if len(row):
                pieces = sorted(set(row.tolist()))
                weights = np.asarray(w_bow[..., pieces], dtype=np.float64)  # (..., M)
                out[..., k] = np.add.reduceat(weights, [0], axis=-1)[..., 0]
        return out.T  # (N, ...)
    lengths = np.fromiter((len(row) for row in ids), dtype=np.int64, count=n)
    if lengths.sum():
        rows = np.repeat(np.arange(n, dtype=np.int64), lengths)
        # Distinct (text, piece) pairs, sorted by text: one key per pair.
        keys = np.unique(rows * vocab + np.concatenate(ids).astype(np.int64))
        text, piece = np.divmod(keys, vocab)
        found = np.bincount(text, minlength=n)  # (N,) distinct pieces per text
        present = found > 0
        starts = np.concatenate([[0], np.cumsum(found)[:-1]])[present]
        weights = np.asarray(w_bow[..., piece], dtype=np.float64)  # (..., M)
        out[..., present] = np.add.reduceat(weights, starts, axis=-1)
    return out.T  # (N, ...)


@dataclass(frozen=True)
class LinearHead:
    """One target's logistic head over the three feature groups (weights unscaled)."""

    w_emb: np.ndarray  # (H,)
    w_lex: np.ndarray  # (N_LEXICAL,)
    w_bow: np.ndarray  # (V,)
    bias: float

    def logits(self, emb: np.ndarray, lex: np.ndarray, ids: Sequence[np.ndarray]) -> np.ndarray:
        """Logits for (N, H) embeddings, (N, N_LEXICAL) alias features and word-piece ids."""
        dense = emb @ self.w_emb + lex @ self.w_lex + self.bias
        return np.asarray(dense + bow_logits(ids, self.w_bow), dtype=np.float64)
