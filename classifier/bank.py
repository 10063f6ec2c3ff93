"""The set of active targets, classified together in two stages, swapped atomically."""

from __future__ import annotations

import dataclasses
import hashlib
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .calibrate import sigmoid
from .conversation import conversation_pieces, segments
from .details import DetailIndex
from .embed import Embedder
from .features import (
    N_LEXICAL,
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
_STAGES = (STAGE_STATIC, STAGE_FULL, STAGE_ALIAS)  # the codes of `_Verdicts.stage`

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


@dataclass(frozen=True, eq=False)
class _Verdicts:
    """One text's verdict on every target (T of them) as arrays: a `Decision` per target costs
    about a microsecond to build, so they are built once per request, not per text read."""

    score: np.ndarray  # (T,) float64, of the deciding stage
    threshold: np.ndarray  # (T,) float64
    flagged: np.ndarray  # (T,) bool
    stage: np.ndarray  # (T,) int8: index into _STAGES
    spans: Mapping[int, tuple[tuple[int, int], ...]]  # target -> spans, for flagged targets only
    hits: tuple[int, ...]  # the flagged targets, in order (np.flatnonzero(flagged))

    def __post_init__(self) -> None:
        for a in (self.score, self.threshold, self.flagged, self.stage):
            if a.flags.writeable:
                a.setflags(write=False)  # shared by the cache: never changed once made

    @staticmethod
    def of(
        score: np.ndarray,
        threshold: np.ndarray,
        flagged: np.ndarray,
        stage: np.ndarray,
        spans: Mapping[int, tuple[tuple[int, int], ...]],
    ) -> _Verdicts:
        return _Verdicts(
            score, threshold, flagged, stage, spans, tuple(np.flatnonzero(flagged).tolist())
        )


def _merge(sent: _Verdicts, view: _Verdicts) -> _Verdicts:
    """The verdict over the text as sent and its normalised view, per target: the text's own
    when it is flagged or the view is neither flagged nor scored higher; spans: the text's own."""
    keep = np.asarray(sent.flagged | (~view.flagged & (sent.score >= view.score)))  # (T,)
    if keep.all():
        return sent
    return _Verdicts.of(
        np.where(keep, sent.score, view.score),
        np.where(keep, sent.threshold, view.threshold),
        np.where(keep, sent.flagged, view.flagged),
        np.where(keep, sent.stage, view.stage),
        {t: spans for t, spans in sent.spans.items() if keep[t]},
    )


def _best(rows: Sequence[_Verdicts]) -> _Verdicts:
    """Per target, the first of `rows` with the highest (flagged, score): the verdict over
    several texts read together."""
    if len(rows) == 1:
        return rows[0]
    flagged = np.stack([r.flagged for r in rows])  # (R, T)
    score = np.stack([r.score for r in rows])  # (R, T)
    # Among the rows flagged (all rows when none is), the first of the highest score.
    top = np.asarray(flagged.any(axis=0))  # (T,)
    pick = np.where(flagged == top[None], score, -np.inf).argmax(axis=0)  # (T,)
    cols = np.arange(score.shape[1])
    best = flagged[pick, cols]
    spans = {}  # a target flagged on a normalised view has no spans (they are the view's)
    for t in np.flatnonzero(best).tolist():
        found = rows[pick[t]].spans.get(t)
        if found is not None:
            spans[t] = found
    return _Verdicts.of(
        score[pick, cols],
        np.stack([r.threshold for r in rows])[pick, cols],
        best,
        np.stack([r.stage for r in rows])[pick, cols],
        spans,
    )


class _VerdictCache:
    """Least-recently-used verdicts of one snapshot's targets, by text (a 128-bit digest, so a
    long text costs no memory here). Chat clients re-send the earlier turns and the same system
    prompt with every request, and the guard reads each turn alone as well as joined.
    Memory: about (800 + 18 x targets) bytes per entry (2.6 kB at 100 targets)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[bytes, _Verdicts] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def key(text: str) -> bytes:
        return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()

    def get(self, key: bytes) -> _Verdicts | None:
        with self._lock:
            found = self._items.get(key)
            if found is not None:
                self._items.move_to_end(key)
            return found

    def put(self, key: bytes, verdicts: _Verdicts) -> None:
        if self.size <= 0:
            return
        with self._lock:
            self._items[key] = verdicts
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)


class _Snapshot:
    """Immutable stacked weights of a set of targets (T targets, H embedding dims), and the
    verdicts cached for them (a new set of targets starts with an empty cache)."""

    def __init__(
        self, targets: tuple[TargetClassifier, ...], embedder: Embedder, cache_size: int = 0
    ) -> None:
        self.targets = targets
        self.names = tuple(t.name for t in targets)
        self.cache = _VerdictCache(cache_size)
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
        # What a text no target's gate passes and no alias flags has on every target, but its
        # scores: shared by all such verdicts (read-only), not copied for each.
        self.plain = (
            sigmoid(self.gate),  # threshold
            np.zeros(len(targets), dtype=bool),  # flagged
            np.zeros(len(targets), dtype=np.int8),  # stage: static
        )
        for a in self.plain:
            a.setflags(write=False)

    def plain_verdict(self, score: np.ndarray) -> _Verdicts:
        """The verdict of a text no gate passes and no alias flags, from its (T,) scores
        (copied: a cached verdict keeps its own row, not the whole batch's array)."""
        return _Verdicts(score.copy(), *self.plain, {}, ())


def _named_in_full(snap: _Snapshot, matches: Sequence[Sequence[AliasMatch]]) -> np.ndarray:
    """(N, T): whether text i names target t in full by an alias that flags by itself."""
    named = np.zeros((len(matches), len(snap.targets)), dtype=bool)
    for i, found in enumerate(matches):
        for t in {m.target for m in found}:
            named[i, t] = named_in_full(found, t, snap.targets[t].flags_alias)
    return named


def _logits(
    emb: np.ndarray, lex: np.ndarray, ids: list[np.ndarray], head: tuple[np.ndarray, ...]
) -> np.ndarray:
    w_emb, w_lex, w_bow, bias = head
    # emb (N, H) . (H, T) + sum over the 5 lexical features of (N, T, 5) * (T, 5) -> (N, T)
    dense = emb @ w_emb.T + (lex * w_lex[None]).sum(-1) + bias[None]
    return np.asarray(dense + bow_logits(ids, w_bow), dtype=np.float64)


class ClassifierBank:
    """Thread-safe holder of the active targets; readers never see a half-updated set.

    The verdicts on the last `cache_size` distinct texts read are kept (per set of targets:
    `set_targets`, `add` and `remove` start an empty cache); 0 turns the cache off. An entry
    holds arrays, not Decisions: about 2.6 kB at 100 targets, so 4,096 of them about 11 MB. A
    text found there gets the verdict it got in the batch it was first read in (MiniLM's
    embedding of a text can differ in its last bits from one batch to another, as it did before
    the cache).
    """

    def __init__(
        self,
        embedder: Embedder,
        targets: Iterable[TargetClassifier] = (),
        *,
        cache_size: int = 4096,
    ) -> None:
        self.embedder = embedder
        self.cache_size = cache_size
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
        snapshot = _Snapshot(new, self.embedder, self.cache_size)
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
        snap = self._snapshot
        return [self._decisions(snap, v) for v in self._verdicts(snap, texts, normalized)]

    def classify_all(self, texts: Sequence[str]) -> list[Decision]:
        """One Decision per active target over several texts read together (a conversation
        joined, and each of its turns alone): flagged when flagged on any of them."""
        return self.classify_groups([texts])[0]

    def classify_groups(
        self, groups: Sequence[Sequence[str]], *, only_flagged: bool = False
    ) -> list[list[Decision]]:
        """`classify_all` for several groups of texts (several requests) in one batched pass.

        `only_flagged`: each group's Decisions for the targets it is flagged for only (the same
        Decisions, in target order): what the guard acts on, without building a Decision per
        target for every request (at 100 targets that was half the cost of a burst's batch).
        """
        snap = self._snapshot
        decided = self._by_text(snap, groups, False)
        return [self._group(snap, group, decided, only_flagged) for group in groups]

    def settled_groups(self, groups: Sequence[Sequence[str]]) -> list[list[Decision] | None]:
        """`classify_groups(groups, only_flagged=True)` for each group the static stage settles
        (each of its texts cached, or none with a piece that passes the gate of a target the
        text does not name in full), None for
        the others: MiniLM never runs here, and what it would have to read is not cached. The
        same Decisions as `classify_groups`, for a fraction of its cost when MiniLM has nothing
        to read: cheap enough to run where the caller stands (the guard's event loop)."""
        snap = self._snapshot
        decided = self._by_text(snap, groups, True)
        return [
            None
            if any(t in decided and decided[t] is None for t in group)
            else self._group(snap, group, decided, True)
            for group in groups
        ]

    def _by_text(
        self, snap: _Snapshot, groups: Sequence[Sequence[str]], static_only: bool
    ) -> dict[str, _Verdicts | None]:
        """The verdicts on every distinct non-blank text of `groups` (`_some_verdicts`)."""
        unique = list(dict.fromkeys(t for group in groups for t in group if t.strip()))
        return dict(zip(unique, self._some_verdicts(snap, unique, True, static_only), strict=True))

    def _group(
        self,
        snap: _Snapshot,
        group: Sequence[str],
        decided: Mapping[str, _Verdicts | None],
        only_flagged: bool,
    ) -> list[Decision]:
        """One group's Decisions from its texts' verdicts (blank texts have none)."""
        rows = [v for t in dict.fromkeys(group) if (v := decided.get(t)) is not None]
        if not rows:
            return [] if only_flagged else [self._empty(t) for t in snap.targets]
        if only_flagged:
            return self._flagged(snap, _best(rows))
        return self._decisions(snap, _best(rows))

    @staticmethod
    def _empty(target: TargetClassifier) -> Decision:
        return Decision(target.name, 0.0, target.gate_threshold, False, STAGE_STATIC)

    @staticmethod
    def _decisions(snap: _Snapshot, v: _Verdicts) -> list[Decision]:
        out = [
            Decision(name, score, threshold, flagged, _STAGES[stage])
            for name, score, threshold, flagged, stage in zip(
                snap.names,
                v.score.tolist(),
                v.threshold.tolist(),
                v.flagged.tolist(),
                v.stage.tolist(),
                strict=True,
            )
        ]
        for t, spans in v.spans.items():
            out[t] = dataclasses.replace(out[t], spans=spans)
        return out

    @staticmethod
    def _flagged(snap: _Snapshot, v: _Verdicts) -> list[Decision]:
        return [
            Decision(
                snap.names[t],
                float(v.score[t]),
                float(v.threshold[t]),
                True,
                _STAGES[v.stage[t]],
                v.spans.get(t, ()),
            )
            for t in v.hits
        ]

    def stream_scanner(self) -> tuple[StreamScanner, tuple[str, ...]]:
        """A scanner of generated text for the active targets, and their names by index."""
        snap = self._snapshot
        return snap.scanner, snap.names

    def find_spans(self, text: str, names: Iterable[str]) -> dict[str, list[tuple[int, int]]]:
        """Character spans of `text` that name each of the active targets `names` (their
        aliases, typo-tolerant, and their obfuscated forms mapped back to `text`)."""
        snap = self._snapshot
        wanted = [snap.by_name[n] for n in names if n in snap.by_name]
        if not wanted:
            return {}
        matches = snap.index.match_view(_clean(text))
        return {snap.targets[t].name: accepted_spans(matches, t) for t in wanted}

    def classify_messages(
        self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Any] = ()
    ) -> list[Decision]:
        """Classify a chat conversation: every turn alone and all of them joined."""
        joined, pieces = conversation_pieces(messages, tools)
        return self.classify_all([joined, *(p.text for p in pieces)])

    def _verdicts(self, snap: _Snapshot, texts: Sequence[str], normalized: bool) -> list[_Verdicts]:
        """Each text's verdicts: from the cache, or classified in one batch with the other
        texts not found there (and the normalised views of those that have one)."""
        got = self._some_verdicts(snap, texts, normalized, False)
        return [v for v in got if v is not None]  # all of them: nothing left unsettled

    def _some_verdicts(
        self, snap: _Snapshot, texts: Sequence[str], normalized: bool, static_only: bool
    ) -> list[_Verdicts | None]:
        """`_verdicts`; with `static_only`, None (not cached) for a text MiniLM must read, on
        its own or in its normalised view."""
        texts = [_clean(t) for t in texts]
        if not normalized:
            return list(self._classify(snap, texts, static_only))
        keys = [_VerdictCache.key(t) for t in texts] if snap.cache.size > 0 else []
        found = [snap.cache.get(k) for k in keys] if keys else [None] * len(texts)
        todo = [i for i, v in enumerate(found) if v is None]
        if not todo:
            return list(found)
        missing = [texts[i] for i in todo]
        views = [normalize(t) for t in missing]
        extra = [k for k, (t, v) in enumerate(zip(missing, views, strict=True)) if v != t]
        decided = self._classify(snap, [*missing, *(views[k] for k in extra)], static_only)
        new = decided[: len(missing)]
        for j, k in enumerate(extra):
            seen, view = new[k], decided[len(missing) + j]
            new[k] = None if seen is None or view is None else _merge(seen, view)
        out: list[_Verdicts | None] = []
        fresh = iter(new)
        for i, v in enumerate(found):
            if v is None:
                v = next(fresh)
                if keys and v is not None:
                    snap.cache.put(keys[i], v)
            out.append(v)
        return out

    def _classify(
        self, snap: _Snapshot, texts: Sequence[str], static_only: bool = False
    ) -> list[_Verdicts | None]:
        """Both stages over every piece of `texts`; `static_only`: None for each text with a
        piece that passes a target's gate, MiniLM not run."""
        if not snap.targets:
            empty = np.zeros(0)
            none = _Verdicts(empty, empty, empty.astype(bool), empty.astype(np.int8), {}, ())
            return [none for _ in texts]
        pieces: list[tuple[int, int, str]] = []  # (text index, offset, segment)
        bounds = [0]  # text i's pieces: bounds[i]:bounds[i + 1]
        matches: list[list[AliasMatch]] = []
        for i, text in enumerate(texts):
            matches.append(snap.index.match(text))
            pieces += [(i, off, seg) for off, seg in segments(text)]
            bounds.append(len(pieces))
        n_t = len(snap.targets)
        lex = np.zeros((len(pieces), n_t, N_LEXICAL), dtype=np.float32)  # (P, T, 5)
        for p, (i, off, seg) in enumerate(pieces):
            if matches[i]:  # most texts name nobody: their alias features stay 0
                lex[p] = self._piece_lex(matches[i], off, len(seg), n_t)
            add_details(lex[p], seg, snap.details)  # the view: filled in place
        seg_texts = [seg for _, _, seg in pieces]
        # The static-only read runs on the event loop (settled_groups): it keeps the GIL.
        ids = self.embedder.token_ids(seg_texts, pool=not static_only)
        s1 = _logits(self.embedder.static_from_ids(ids), lex, ids, snap.static)  # (P, T)
        # A target a text names in full is flagged whatever stage 2 would say: MiniLM reads a
        # piece only for the other targets its gates pass (a prompt naming one target and no
        # other settles on the event loop, `settled_groups`).
        named = _named_in_full(snap, matches)  # (N, T)
        gated = (s1 > snap.gate[None]) | names_target(lex)  # (P, T)
        gated &= ~named[[i for i, _, _ in pieces]]
        s2 = np.full_like(s1, -np.inf)
        rows = np.flatnonzero(gated.any(axis=1))
        if len(rows) and static_only:
            unsettled = {pieces[r][0] for r in rows.tolist()}
            decided = self._decide(snap, matches, bounds, (s1, s2), gated, named)
            return [None if i in unsettled else v for i, v in enumerate(decided)]
        if len(rows):
            emb = self.embedder.encode([seg_texts[r] for r in rows])
            s2[rows] = _logits(emb, lex[rows], [ids[r] for r in rows], snap.full)
        return list(self._decide(snap, matches, bounds, (s1, s2), gated, named))

    @staticmethod
    def _piece_lex(matches: list[AliasMatch], off: int, length: int, n_t: int) -> np.ndarray:
        # Windows overlap; a name cut by a window's edge still counts for that window.
        touching = [m for m in matches if m.start < off + length and m.end > off]
        return lexical_features(touching, n_t)

    @staticmethod
    def _decide(
        snap: _Snapshot,
        matches: list[list[AliasMatch]],
        bounds: list[int],
        logits: tuple[np.ndarray, np.ndarray],
        gated: np.ndarray,
        named: np.ndarray,
    ) -> list[_Verdicts]:
        """Each text's verdicts on every target from its pieces' rows (text i: rows
        bounds[i]:bounds[i + 1], at least one): array operations over the whole batch.
        `logits`: the (P, T) static and stage-2 logits (-inf where not read); `named`: (N, T),
        the targets each text names in full (never gated: flagged by alias, scored statically)."""
        s1, s2 = logits
        if not gated.any() and not named.any():
            # No gate passed, no name: each text's best static logit decides, nothing flagged
            # (what the general case below gives, with a fraction of its array operations).
            single = len(s1) == len(matches)  # one piece per text
            best = s1 if single else np.maximum.reduceat(s1, bounds[:-1], axis=0)  # (N, T)
            top = sigmoid(best)
            return [snap.plain_verdict(row) for row in top]
        starts = np.asarray(bounds[:-1])  # (N,)
        any_gated = np.logical_or.reduceat(gated, starts, axis=0)  # (N, T)
        # (N, T): best stage-2 logit over the gated rows, best static logit over all rows
        full = np.maximum.reduceat(np.where(gated, s2, -np.inf), starts, axis=0)
        static = np.maximum.reduceat(s1, starts, axis=0)
        score = sigmoid(np.where(any_gated, full, static))
        thr = sigmoid(np.where(any_gated, snap.threshold[None], snap.gate[None]))
        flagged = (any_gated & (full > snap.threshold[None])) | named
        stage = np.where(named, 2, any_gated).astype(np.int8)  # 0: static, 1: full, 2: alias
        hits: dict[int, list[int]] = {}  # text -> its flagged targets, in order
        for i, t in zip(*(a.tolist() for a in np.nonzero(flagged)), strict=True):
            hits.setdefault(i, []).append(t)
        # Texts with no gate passed and nothing flagged: the snapshot's shared `plain` rows.
        plain: list[bool] = np.asarray(~any_gated.any(axis=1)).tolist()  # (N,)
        out = []
        for i, found in enumerate(matches):
            # Copies: a cached verdict keeps its own rows, not the whole batch's arrays.
            if plain[i] and i not in hits:
                out.append(snap.plain_verdict(score[i]))
                continue
            ts = tuple(hits.get(i, ()))
            spans = {t: tuple(accepted_spans(found, t)) for t in ts}
            out.append(
                _Verdicts(
                    score[i].copy(), thr[i].copy(), flagged[i].copy(), stage[i].copy(), spans, ts
                )
            )
        return out
