"""The set of active targets, classified together in two stages, swapped atomically."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .calibrate import sigmoid
from .conversation import conversation_pieces, segments
from .details import DetailIndex
from .embed import Embedder
from .features import (
    add_details,
    bow_logits,
    lexical_features,
    named_in_full,
    names_target,
)
from .model import TargetClassifier, build_index
from .normalize import normalize
from .spans import AliasMatch, accepted_spans
from .stream import StreamScanner

STAGE_STATIC = "static"
STAGE_FULL = "full"
STAGE_ALIAS = "alias"
"""Flagged because the text names an alias in full (whatever the score)."""

_SURROGATES = re.compile("[\ud800-\udfff]")


def _clean(text: str) -> str:
    """Lone surrogates (valid in JSON escapes, not in UTF-8) as U+FFFD, one for one, so the
    tokenizers never raise and offsets stay those of the text."""
    return text if text.isascii() else _SURROGATES.sub("\ufffd", text)


@dataclass(frozen=True)
class Decision:
    """One target's verdict on one text; score and threshold belong to the deciding `stage`."""

    target: str
    score: float
    threshold: float
    flagged: bool
    stage: str
    spans: tuple[tuple[int, int], ...] = ()


class _Snapshot:
    """Immutable stacked weights of a set of targets (T targets, H embedding dims)."""

    def __init__(self, targets: tuple[TargetClassifier, ...], embedder: Embedder) -> None:
        self.targets = targets
        self.index = build_index(targets, embedder)

        def stack(attr: str) -> tuple[np.ndarray, ...]:
            heads = [getattr(t, attr) for t in targets]
            return (
                np.stack([h.w_emb for h in heads]).astype(np.float32),  # (T, H)
                np.stack([h.w_lex for h in heads]).astype(np.float32),  # (T, 5)
                np.stack([h.w_bow for h in heads]).astype(np.float32),  # (T, V)
                np.array([h.bias for h in heads]),  # (T,)
            )

        if targets:
            self.static = stack("static_head")
            self.full = stack("full_head")
        self.profiles = [t.detail_profiles for t in targets]
        self.details = DetailIndex(self.profiles)
        self.by_name = {t.name: i for i, t in enumerate(targets)}
        self.scanner = StreamScanner(self.index)
        self.gate = np.array([t.gate_logit for t in targets])
        self.threshold = np.array([t.threshold_logit for t in targets])


def _logits(
    emb: np.ndarray, lex: np.ndarray, ids: list[np.ndarray], head: tuple[np.ndarray, ...]
) -> np.ndarray:
    w_emb, w_lex, w_bow, bias = head
    # emb (N, H) . (H, T) + sum over the 5 lexical features of (N, T, 5) * (T, 5) -> (N, T)
    dense = emb @ w_emb.T + (lex * w_lex[None]).sum(-1) + bias[None]
    return np.asarray(dense + bow_logits(ids, w_bow), dtype=np.float64)


def _merge(sent: Decision, view: Decision) -> Decision:
    """The verdict over the text as sent and its normalised view (spans: the text's own)."""
    if sent.flagged or (not view.flagged and sent.score >= view.score):
        return sent
    return Decision(view.target, view.score, view.threshold, view.flagged, view.stage)


class ClassifierBank:
    """Thread-safe holder of the active targets; readers never see a half-updated set."""

    def __init__(self, embedder: Embedder, targets: Iterable[TargetClassifier] = ()) -> None:
        self.embedder = embedder
        self._lock = threading.Lock()
        self._snapshot = _Snapshot((), embedder)
        self.set_targets(targets)

    @property
    def targets(self) -> tuple[TargetClassifier, ...]:
        """The active targets, in order."""
        return self._snapshot.targets

    def set_targets(self, targets: Iterable[TargetClassifier]) -> None:
        """Replace the whole set at once (copy-on-write)."""
        new = tuple(targets)
        names = [t.name for t in new]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate target names in {names}")
        for t in new:
            if t.embedder_fingerprint != self.embedder.fingerprint:
                raise ValueError(f"target {t.name!r} was trained with another embedder")
        snapshot = _Snapshot(new, self.embedder)
        with self._lock:
            self._snapshot = snapshot

    def add(self, target: TargetClassifier) -> None:
        """Activate a target, replacing any target of the same name."""
        with self._lock:
            current = self._snapshot.targets
        self.set_targets([t for t in current if t.name != target.name] + [target])

    def remove(self, name: str) -> bool:
        """Deactivate a target by name; False if it was not active."""
        with self._lock:
            current = self._snapshot.targets
        kept = [t for t in current if t.name != name]
        self.set_targets(kept)
        return len(kept) != len(current)

    def classify(self, texts: Sequence[str], *, normalized: bool = True) -> list[list[Decision]]:
        """One Decision per active target for each text (batched, two-stage).

        A text that `normalize` changes (leetspeak, homoglyphs, spelled-out words) is scored a
        second time as its de-obfuscated view; a target flagged in either view is flagged.
        `normalized=False` scores the text as sent only (for measuring what the view adds).
        """
        texts = [_clean(t) for t in texts]
        if not normalized:
            return self._classify(texts)
        views = [normalize(t) for t in texts]
        extra = [i for i, (t, v) in enumerate(zip(texts, views, strict=True)) if v != t]
        if not extra:
            return self._classify(texts)
        decided = self._classify([*texts, *(views[i] for i in extra)])
        out = decided[: len(texts)]
        for k, i in enumerate(extra):
            out[i] = [_merge(a, b) for a, b in zip(out[i], decided[len(texts) + k], strict=True)]
        return out

    def classify_all(self, texts: Sequence[str]) -> list[Decision]:
        """One Decision per active target over several texts read together (a conversation
        joined, and each of its turns alone): flagged when flagged on any of them."""
        return self.classify_groups([texts])[0]

    def classify_groups(self, groups: Sequence[Sequence[str]]) -> list[list[Decision]]:
        """`classify_all` for several groups of texts (several requests) in one batched pass."""
        unique = list(dict.fromkeys(t for group in groups for t in group if t.strip()))
        decided = dict(zip(unique, self.classify(unique), strict=True)) if unique else {}
        out = []
        for group in groups:
            rows = [decided[t] for t in dict.fromkeys(group) if t in decided]
            if not rows:
                out.append([self._empty(t) for t in self._snapshot.targets])
                continue
            columns = zip(*rows, strict=True)  # one column of decisions per target
            out.append([max(column, key=lambda d: (d.flagged, d.score)) for column in columns])
        return out

    @staticmethod
    def _empty(target: TargetClassifier) -> Decision:
        return Decision(target.name, 0.0, target.gate_threshold, False, STAGE_STATIC)

    def stream_scanner(self) -> tuple[StreamScanner, tuple[str, ...]]:
        """A scanner of generated text for the active targets, and their names by index."""
        snap = self._snapshot
        return snap.scanner, tuple(t.name for t in snap.targets)

    def find_spans(self, text: str, names: Iterable[str]) -> dict[str, list[tuple[int, int]]]:
        """Character spans of `text` that name each of the active targets `names` (their
        aliases, typo-tolerant, and their obfuscated forms mapped back to `text`)."""
        snap = self._snapshot
        wanted = [snap.by_name[n] for n in names if n in snap.by_name]
        if not wanted:
            return {}
        matches = snap.index.match_view(_clean(text))
        return {snap.targets[t].name: accepted_spans(matches, t) for t in wanted}

    def _classify(self, texts: Sequence[str]) -> list[list[Decision]]:
        snap = self._snapshot
        if not snap.targets:
            return [[] for _ in texts]
        pieces: list[tuple[int, int, str]] = []  # (text index, offset, segment)
        matches: list[list[AliasMatch]] = []
        for i, text in enumerate(texts):
            matches.append(snap.index.match(text))
            pieces += [(i, off, seg) for off, seg in segments(text)]
        n_t = len(snap.targets)
        lex = np.stack(
            [
                add_details(self._piece_lex(matches[i], off, len(seg), n_t), seg, snap.details)
                for i, off, seg in pieces
            ]
        )
        seg_texts = [seg for _, _, seg in pieces]
        ids = self.embedder.token_ids(seg_texts)
        s1 = _logits(self.embedder.static_from_ids(ids), lex, ids, snap.static)  # (P, T)
        gated = (s1 > snap.gate[None]) | names_target(lex)  # (P, T)
        s2 = np.full_like(s1, -np.inf)
        rows = np.flatnonzero(gated.any(axis=1))
        if len(rows):
            emb = self.embedder.encode([seg_texts[r] for r in rows])
            s2[rows] = _logits(emb, lex[rows], [ids[r] for r in rows], snap.full)
        return [
            self._decide(
                snap,
                matches[i],
                [p for p, piece in enumerate(pieces) if piece[0] == i],
                s1,
                s2,
                gated,
            )
            for i in range(len(texts))
        ]

    def classify_messages(
        self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Any] = ()
    ) -> list[Decision]:
        """Classify a chat conversation: every turn alone and all of them joined."""
        joined, pieces = conversation_pieces(messages, tools)
        return self.classify_all([joined, *(p.text for p in pieces)])

    @staticmethod
    def _piece_lex(matches: list[AliasMatch], off: int, length: int, n_t: int) -> np.ndarray:
        # Windows overlap; a name cut by a window's edge still counts for that window.
        touching = [m for m in matches if m.start < off + length and m.end > off]
        return lexical_features(touching, n_t)

    @staticmethod
    def _decide(
        snap: _Snapshot,
        matches: list[AliasMatch],
        rows: list[int],
        s1: np.ndarray,
        s2: np.ndarray,
        gated: np.ndarray,
    ) -> list[Decision]:
        """One text's decision per target, from its pieces' `rows` (one pass over all targets:
        the per-target work is array operations, plus the alias checks of the targets named)."""
        g = gated[rows]  # (R, T)
        any_gated = g.any(axis=0)  # (T,)
        full = np.where(g, s2[rows], -np.inf).max(axis=0)  # (T,) best stage-2 logit, gated rows
        static = s1[rows].max(axis=0)  # (T,)
        logit = np.where(any_gated, full, static)
        thr = np.where(any_gated, snap.threshold, snap.gate)
        flagged = any_gated & (full > snap.threshold)
        stage = np.where(any_gated, STAGE_FULL, STAGE_STATIC).astype(object)
        for t in {m.target for m in matches}:  # only targets the text names can flag by alias
            if not flagged[t] and named_in_full(matches, t, snap.targets[t].flags_alias):
                flagged[t], stage[t] = True, STAGE_ALIAS
        score, bar = sigmoid(logit), sigmoid(thr)
        return [
            Decision(
                target.name,
                float(score[t]),
                float(bar[t]),
                bool(flagged[t]),
                str(stage[t]),
                tuple(accepted_spans(matches, t)) if flagged[t] else (),
            )
            for t, target in enumerate(snap.targets)
        ]
