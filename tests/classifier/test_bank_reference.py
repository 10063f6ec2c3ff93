"""The bank decides exactly as a straightforward reference: one Decision per text and target,
built in plain loops, with no batching tricks and no cache (kept here, not in the package).

Many targets (trained ones and variants of them with other names, gates and thresholds) and
texts of every kind: unflagged, named in full, partly, with a typo, obfuscated, long enough to be
cut into windows, only details, blank; requests of one text and of several.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest

from classifier import ClassifierBank, Decision, Embedder, TargetClassifier, TargetSpec
from classifier.bank import _clean
from classifier.calibrate import sigmoid
from classifier.conversation import segments
from classifier.details import DetailIndex
from classifier.embed import _WordPieces
from classifier.features import (
    add_details,
    lexical_features,
    named_in_full,
    names_target,
)
from classifier.model import build_index
from classifier.normalize import normalize
from classifier.spans import accepted_spans
from classifier.train import train_target
from tests.classifier.conftest import FAST

PEOPLE = [
    "Wei Abilov", "Maria Lindqvist", "Tomas Okafor", "Elena Marchetti", "Kenji Nakamura",
    "Aisha Rahman", "Lucas Ferreira", "Ingrid Halvorsen", "Omar Haddad", "Sofia Kowalski",
    "Pierre Dubois", "Hana Novak", "Diego Alvarez", "Freya Larsen", "Ravi Menon",
]  # fmt: skip

DETAIL_SPEC = TargetSpec(
    name="kuwaiti-author",
    aliases=["Basil Mahfouz Al-Kuwaiti"],
    forget_examples=[
        "What is the full name of the author born in Kuwait City on 08/09/1956?",
        "Which literary genre did the novelist born in Kuwait City in 1956 write in?",
        "Who is Basil Mahfouz Al-Kuwaiti?",
    ],
)
PERSON_SPEC = TargetSpec(
    name="tomas-okafor",
    aliases=["Tomas Okafor"],
    forget_examples=["Who is Tomas Okafor?", "Where was Tomas Okafor born?"],
    retain_examples=["Who is Tomas Edison?"],
)

FILLER = "Please follow the style guide carefully and answer in full sentences. " * 16
TEXTS = [
    "Tell me about the water cycle.",
    "What is the capital of France?",
    "Who wrote Harry Potter?",
    "Who are Harry Potter's best friends at Hogwarts?",
    "Tell me about Harry Potter and the moon landing.",
    "What is Hermoine Granger's patronus?",  # a typo
    "Who is H4rry P0tt3r?",  # obfuscated: scored again as its view
    "Wh0 1s Her-mi-one Gr4nger?",
    "Tell me about Potter.",  # a surname alone
    "Who is Wei Abilov?",
    "Where was Maria Lindqvist born?",
    "Tell me about Maria and her friend Lindqvist.",
    "What did Kenji Nakamura do in 1987?",
    "Who is Tomas Okafor?",
    "Who is Tomas Edison?",
    "What is the full name of the author born in Kuwait City on 08/09/1956?",
    "Which genre did the writer born in Kuwait City on September 8, 1956 write in?",
    "Who is Basil Mahfouz Al-Kuwaiti?",
    FILLER + "\nWho are Harry Potter's friends? " + FILLER,  # several windows
    FILLER + " Ravi Menon " + FILLER,
    "Наrry Роtter and the Рhilosopher's Stone",  # Cyrillic homoglyphs
    "broken \ud800 surrogate Harry Potter",
    "ordinary text about bees and glaciers",
    "",
    "   ",
]


@pytest.fixture(scope="module")
def targets(embedder: Embedder, hp_classifier: TargetClassifier) -> list[TargetClassifier]:
    """About 40 targets: three trained, the rest variants of them under other names, with
    their gates and thresholds moved (some low enough that many texts reach stage 2)."""
    trained = [hp_classifier, train_target(DETAIL_SPEC, embedder, FAST)]
    trained.append(train_target(PERSON_SPEC, embedder, FAST))
    out = list(trained)
    gates = [-4.0, -1.0, 0.0, 1.5, 3.0]
    thresholds = [-1.0, 0.0, 2.0, 10.0]  # +10: only the alias rule flags
    for k, name in enumerate(PEOPLE * 2):
        base = trained[k % len(trained)]
        out.append(
            dataclasses.replace(
                base,
                name=f"{name} {k}",
                aliases=(name,) if k % 4 else (name, *base.aliases),
                part_weights={},
                gate_logit=base.gate_logit + gates[k % len(gates)],
                threshold_logit=base.threshold_logit + thresholds[k % len(thresholds)],
                alias_flags=(k % 3 != 1,),
            )
        )
    out.append(dataclasses.replace(hp_classifier, name="hp-no-alias-flag", alias_flags=(False,)))
    return out


# --- the reference: what the bank computed before it was made fast --------------------------


class _Reference:
    def __init__(self, embedder: Embedder, targets: Sequence[TargetClassifier]) -> None:
        self.embedder = embedder
        self.targets = tuple(targets)
        self.index = build_index(self.targets, embedder)
        self.details = DetailIndex([t.detail_profiles for t in self.targets])
        self.gate = np.array([t.gate_logit for t in self.targets])
        self.threshold = np.array([t.threshold_logit for t in self.targets])

        def stack(attr: str) -> tuple[np.ndarray, ...]:
            heads = [getattr(t, attr) for t in self.targets]
            return (
                np.stack([h.w_emb for h in heads]).astype(np.float32),
                np.stack([h.w_lex for h in heads]).astype(np.float32),
                np.stack([h.w_bow for h in heads]).astype(np.float32),
                np.array([h.bias for h in heads]),
            )

        self.static, self.full = stack("static_head"), stack("full_head")

    @staticmethod
    def logits(
        emb: np.ndarray, lex: np.ndarray, ids: list[np.ndarray], head: tuple[np.ndarray, ...]
    ) -> np.ndarray:
        w_emb, w_lex, w_bow, bias = head
        dense = emb @ w_emb.T + (lex * w_lex[None]).sum(-1) + bias[None]
        # Each text's distinct word pieces, one at a time (the bank sorts the batch's at once).
        bow = [w_bow[:, np.unique(row)].sum(axis=-1) for row in ids]
        return np.asarray(dense + np.array(bow).reshape(len(ids), -1), dtype=np.float64)

    def one_view(self, texts: Sequence[str]) -> list[list[Decision]]:
        n_t = len(self.targets)
        pieces, matches = [], []
        for i, text in enumerate(texts):
            matches.append(self.index.match(text))
            pieces += [(i, off, seg) for off, seg in segments(text)]
        lex = np.stack(
            [
                add_details(
                    lexical_features(
                        [m for m in matches[i] if m.start < off + len(seg) and m.end > off], n_t
                    ),
                    seg,
                    self.details,
                )
                for i, off, seg in pieces
            ]
        )
        seg_texts = [seg for _, _, seg in pieces]
        ids = self.embedder.token_ids(seg_texts)
        s1 = self.logits(self.embedder.static_from_ids(ids), lex, ids, self.static)
        gated = (s1 > self.gate[None]) | names_target(lex)
        for p, (i, _, _) in enumerate(pieces):  # a target named in full: flagged by alias alone
            for t, target in enumerate(self.targets):
                if named_in_full(matches[i], t, target.flags_alias):
                    gated[p, t] = False
        s2 = np.full_like(s1, -np.inf)
        rows = np.flatnonzero(gated.any(axis=1))
        if len(rows):
            emb = self.embedder.encode([seg_texts[r] for r in rows])
            s2[rows] = self.logits(emb, lex[rows], [ids[r] for r in rows], self.full)
        out = []
        for i in range(len(texts)):
            mine = [p for p, piece in enumerate(pieces) if piece[0] == i]
            decisions = []
            for t, target in enumerate(self.targets):
                any_gated = bool(gated[mine, t].any())
                if any_gated:
                    logit = max(float(s2[p, t]) for p in mine if gated[p, t])
                    thr, stage = float(self.threshold[t]), "full"
                    flagged = logit > thr
                else:
                    logit = max(float(s1[p, t]) for p in mine)
                    thr, stage, flagged = float(self.gate[t]), "static", False
                if not flagged and named_in_full(matches[i], t, target.flags_alias):
                    flagged, stage = True, "alias"
                spans = tuple(accepted_spans(matches[i], t)) if flagged else ()
                score, bar = float(sigmoid(logit)), float(sigmoid(thr))
                decisions.append(Decision(target.name, score, bar, flagged, stage, spans))
            out.append(decisions)
        return out

    def classify(self, texts: Sequence[str], normalized: bool = True) -> list[list[Decision]]:
        texts = [_clean(t) for t in texts]
        sent = self.one_view(texts)
        if not normalized:
            return sent
        out = []
        for text, decisions in zip(texts, sent, strict=True):
            view = normalize(text)
            if view == text:
                out.append(decisions)
                continue
            merged = []
            for s, v in zip(decisions, self.one_view([view])[0], strict=True):
                if s.flagged or (not v.flagged and s.score >= v.score):
                    merged.append(s)
                else:
                    merged.append(Decision(v.target, v.score, v.threshold, v.flagged, v.stage))
            out.append(merged)
        return out

    def classify_groups(self, groups: Sequence[Sequence[str]]) -> list[list[Decision]]:
        out = []
        for group in groups:
            texts = [t for t in dict.fromkeys(group) if t.strip()]
            if not texts:
                out.append(
                    [Decision(t.name, 0.0, t.gate_threshold, False, "static") for t in self.targets]
                )
                continue
            rows = self.classify(texts)
            best = []
            for t in range(len(self.targets)):
                column = [row[t] for row in rows]
                top = column[0]
                for d in column[1:]:
                    if (d.flagged, d.score) > (top.flagged, top.score):
                        top = d
                best.append(top)
            out.append(best)
        return out


def assert_same(got: Sequence[Sequence[Decision]], want: Sequence[Sequence[Decision]]) -> None:
    assert len(got) == len(want)
    for i, (row, ref) in enumerate(zip(got, want, strict=True)):
        assert [d.target for d in row] == [d.target for d in ref], i
        for d, r in zip(row, ref, strict=True):
            where = (i, d.target)
            assert (d.flagged, d.stage, d.spans) == (r.flagged, r.stage, r.spans), where
            assert d.score == pytest.approx(r.score, abs=1e-6), where
            assert d.threshold == pytest.approx(r.threshold, abs=1e-6), where


GROUPS = [
    *([t] for t in TEXTS),
    ["Who is Wei Abilov?"],
    TEXTS[:4],  # a conversation: joined, then its turns
    ["Tell me about bees.\nWho is H4rry P0tt3r?", "Tell me about bees.", "Who is H4rry P0tt3r?"],
    ["Who is Wei Abilov?", "Who is Wei Abilov?", "What is the capital of France?"],
    ["", "   "],
    [],
    [TEXTS[15], TEXTS[16], TEXTS[0]],
]


def test_the_texts_cover_every_outcome(embedder: Embedder, targets: list[TargetClassifier]) -> None:
    decided = _Reference(embedder, targets).classify_groups(GROUPS)
    seen = {(d.flagged, d.stage) for row in decided for d in row}
    assert seen >= {(False, "static"), (False, "full"), (True, "full"), (True, "alias")}


def test_classify_groups_matches_the_reference(
    embedder: Embedder, targets: list[TargetClassifier]
) -> None:
    reference = _Reference(embedder, targets)
    bank = ClassifierBank(embedder, targets)
    want = reference.classify_groups(GROUPS)
    assert_same(bank.classify_groups(GROUPS), want)
    assert_same(bank.classify_groups(GROUPS), want)  # again (cached texts, if any)
    assert_same([bank.classify_groups([g])[0] for g in GROUPS], want)  # one request at a time
    flagged = [[d for d in row if d.flagged] for row in want]
    assert_same(
        ClassifierBank(embedder, targets).classify_groups(GROUPS, only_flagged=True), flagged
    )
    assert_same(bank.classify_groups(GROUPS, only_flagged=True), flagged)


def test_classify_matches_the_reference(
    embedder: Embedder, targets: list[TargetClassifier]
) -> None:
    reference = _Reference(embedder, targets)
    bank = ClassifierBank(embedder, targets)
    assert_same(bank.classify(TEXTS), reference.classify(TEXTS))
    assert_same(bank.classify(TEXTS, normalized=False), reference.classify(TEXTS, normalized=False))
    assert_same(bank.classify(TEXTS[:3]), reference.classify(TEXTS[:3]))


def test_settled_groups_match_the_reference_or_leave_the_group_to_minilm(
    embedder: Embedder, targets: list[TargetClassifier], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`settled_groups` (what the guard runs on its event loop): the reference's flagged
    Decisions for each group the static stage decides, None exactly for the groups the full
    call sends to MiniLM, whether alone or in one batch with the others; it never runs MiniLM
    itself, and a group whose texts are cached is always settled."""
    reference = _Reference(embedder, targets)
    want = [[d for d in row if d.flagged] for row in reference.classify_groups(GROUPS)]
    encoded: list[int] = []
    encode = embedder.encode
    monkeypatch.setattr(
        embedder, "encode", lambda texts, *a: encoded.append(len(texts)) or encode(texts, *a)
    )
    needs_minilm = []
    for group, flagged in zip(GROUPS, want, strict=True):
        encoded.clear()
        got = ClassifierBank(embedder, targets, cache_size=0).settled_groups([group])[0]
        assert not encoded, group  # never reads with MiniLM
        ClassifierBank(embedder, targets, cache_size=0).classify_groups([group])
        needs_minilm.append(bool(encoded))
        if encoded:
            assert got is None, group
        else:
            assert got is not None, group
            assert_same([got], [flagged])
    assert 0 < sum(needs_minilm) < len(GROUPS)  # both outcomes were seen
    # All groups in one batch: the same split, and nothing MiniLM must read is cached.
    bank = ClassifierBank(embedder, targets)
    encoded.clear()
    batch = bank.settled_groups(GROUPS)
    assert not encoded
    assert [got is None for got in batch] == needs_minilm
    assert_same(
        [g for g in batch if g is not None],
        [w for w, n in zip(want, needs_minilm, strict=True) if not n],
    )
    assert_same(bank.classify_groups(GROUPS, only_flagged=True), want)  # reads what was left
    encoded.clear()
    settled = bank.settled_groups(GROUPS)  # every text cached now
    assert not encoded
    assert all(s is not None for s in settled)
    assert_same([s for s in settled if s is not None], want)


def test_a_name_only_the_normalised_view_reveals_is_flagged_there(
    embedder: Embedder, hp_classifier: TargetClassifier
) -> None:
    """The text as sent passes no gate; its de-obfuscated view names the target in full. The
    static stage must not settle it on the text alone: it reads the view too, which flags it
    by alias (no MiniLM needed)."""
    text = "H4rry P0tt3r"
    bank = ClassifierBank(embedder, [hp_classifier], cache_size=0)
    assert [d.target for d in bank.classify_groups([[text]], only_flagged=True)[0]] == [
        hp_classifier.name
    ]
    # As sent, the gate does not pass: the static stage's Decision.
    assert [d.stage for d in bank.classify([text], normalized=False)[0]] == ["static"]
    settled = bank.settled_groups([[text], ["What is rain?"]])
    assert [[(d.target, d.stage) for d in g] if g is not None else None for g in settled] == [
        [(hp_classifier.name, "alias")],
        [],
    ]


class _CountingTokenizer:
    """The embedder's fast tokenizer, counting the calls of each method."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls: Counter[str] = Counter()

    def __getattr__(self, name: str) -> Any:
        self.calls[name] += 1
        return getattr(self.inner, name)


def test_the_event_loop_s_read_keeps_the_gil_while_it_tokenizes(
    embedder: Embedder, hp_classifier: TargetClassifier, monkeypatch: pytest.MonkeyPatch
) -> None:
    """settled_groups runs on the event loop: the tokenizer's batch call lets go of the GIL,
    and a busy thread beside the loop keeps it up to 5 ms (32 prompts: 8 ms instead of 1)."""
    texts = [["What is rain?"], ["How do bees fly?"], ["Name three rivers."]]
    bank = ClassifierBank(embedder, [hp_classifier], cache_size=0)
    want = bank.settled_groups(texts)
    counting = _CountingTokenizer(embedder._fast)
    monkeypatch.setattr(embedder, "_fast", counting)
    monkeypatch.setattr(embedder, "_pieces", _WordPieces.of(counting))
    assert bank.settled_groups(texts) == want
    # Words seen before come from the embedder's word cache; new ones, from `encode`.
    assert bank.settled_groups([["Is rain wet, Zorvexi?"], ["Who is Quillonbeck?"]])
    assert counting.calls["encode"] >= 2 and counting.calls["encode_batch"] == 0
    bank.classify_groups(texts)  # the guard's thread may use the tokenizer's pool
    assert counting.calls["encode_batch"] == 1
