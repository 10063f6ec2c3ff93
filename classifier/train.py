"""Train one target: augment, add hard negatives, fit both heads, calibrate by cross-fitting.

Run as `python -m classifier.train --name NAME --alias A --example "..." --out target.bin`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import sparse
from sklearn.linear_model import LogisticRegression

from .augment import alias_variants, augment_positives, near_misses, template_pairs
from .calibrate import CalibrationReport, grouped_threshold, min_negatives, sigmoid
from .details import detail_terms
from .embed import Embedder
from .features import (
    N_LEXICAL,
    LinearHead,
    bag_of_pieces,
    batch_lexical,
    named_in_full,
    names_target,
)
from .lexicon import load_lexicon
from .model import TargetClassifier, TargetSpec
from .negatives import general_negatives
from .spans import AliasIndex, accepted_spans

logger = logging.getLogger(__name__)

POSITIVE, NEAR_MISS, RETAIN = "positive", "near_miss", "retain"


@dataclass(frozen=True)
class TrainConfig:
    """Knobs of `train_target`; the defaults are the ones the evaluation reports."""

    fpr: float = 0.01
    """False-positive rate each kind of held-out negative is calibrated to."""
    seed: int = 0
    folds: int = 5
    """Cross-fitting folds (grouped by source example) for thresholds and held-out recall."""
    n_variants: int = 8
    """Augmented variants per forget example (fewer when there are many examples)."""
    variant_budget: int = 400
    """Cap on all variants together (at least 3 per example): bounds the training time."""
    n_near_misses: int = 4
    """Near-miss negatives per forget example."""
    n_templates: int = 6
    """Entity-template positives (and as many near misses) per alias."""
    c: float = 1.0
    """Inverse L2 strength of both logistic heads."""
    lex_scale: float = 3.0
    """Scale of the alias features relative to the unit-norm embeddings while fitting."""
    bow_scale: float = 1.0
    """Scale of the binary word-piece features while fitting."""
    full_bow: bool = False
    """Give stage 2 the word-piece features too (stage 1 always has them)."""
    max_general: int | None = None
    """Use at most this many shipped general negatives (None: all, about 2,000)."""
    gate_recall: float = 0.995
    """Share of the held-out positives that stage 2 flags which stage 1 must pass on."""
    gate_margin: float = 0.5
    """Logits subtracted from that stage-1 quantile: recall safety for a little latency."""


@dataclass
class _Design:
    """Everything both heads are fitted on; rows are training texts then shipped negatives."""

    texts: list[str]
    y: np.ndarray
    kinds: np.ndarray
    groups: np.ndarray
    ids: list[np.ndarray]
    static: np.ndarray  # (N, H)
    full: np.ndarray  # (N, H)
    lex: np.ndarray  # (N, 4)
    x_static: sparse.csr_matrix
    x_full: sparse.csr_matrix
    cols: np.ndarray  # the word pieces that occur, in x_static's bag-of-pieces columns


@dataclass
class _Data:
    texts: list[str]
    y: np.ndarray
    kinds: np.ndarray
    groups: np.ndarray


class TargetTrainer:
    """Fits one `TargetClassifier` with an `Embedder` and a `TrainConfig`."""

    def __init__(self, embedder: Embedder, config: TrainConfig | None = None) -> None:
        self.embedder = embedder
        self.config = config or TrainConfig()

    def _data(self, spec: TargetSpec, index: AliasIndex) -> _Data:
        cfg, lexicon = self.config, load_lexicon()
        rng = random.Random(cfg.seed)
        examples = list(spec.forget_examples) + ([spec.description] if spec.description else [])
        n_var = max(3, min(cfg.n_variants, cfg.variant_budget // max(len(examples), 1)))
        pos = augment_positives(examples, spec.aliases, index, rng, lexicon, n_var)
        neg = near_misses(examples, spec.aliases, index, rng, lexicon, cfg.n_near_misses, n_var)
        # Enough near misses for their own conformal quantile at the target rate.
        n_templates = cfg.n_templates
        if spec.aliases and len(neg) + n_templates * len(spec.aliases) < min_negatives(cfg.fpr):
            n_templates = math.ceil((min_negatives(cfg.fpr) - len(neg)) / len(spec.aliases))
        t_pos, t_neg = template_pairs(spec.aliases, rng, lexicon, n_templates, len(examples))
        # A near miss never names the target itself (a swapped first name leaving the surname,
        # a garbled variant): it would teach the head that the name is not the target.
        neg = [(t, g) for t, g in neg if not index.spans(t)]
        t_neg = [(t, g) for t, g in t_neg if not index.spans(t)]
        g0 = len(examples) + len(spec.aliases)
        retain = [(t, g0 + i) for i, t in enumerate(spec.retain_examples)]
        rows = [(t, 1, POSITIVE, g) for t, g in pos + t_pos]
        rows += [(t, 0, NEAR_MISS, g) for t, g in neg + t_neg]
        rows += [(t, 0, RETAIN, g) for t, g in retain]
        return _Data(
            texts=[r[0] for r in rows],
            y=np.array([r[1] for r in rows]),
            kinds=np.array([r[2] for r in rows]),
            groups=np.array([r[3] for r in rows]),
        )

    def _assemble(self, spec: TargetSpec, index: AliasIndex) -> _Design:
        """Training texts plus the shipped negatives, as feature matrices for both heads."""
        cfg, emb = self.config, self.embedder
        data = self._data(spec, index)
        g_texts, g_kinds = self._general()
        g_full, g_static = emb.encode_corpus(f"general/{len(g_texts)}", g_texts)
        profiles = [self._profiles(spec, index)]
        g_lex, g_matches = batch_lexical(index, g_texts, profiles)
        # Shipped negatives that name the target are not negatives for it.
        keep = np.array([not accepted_spans(m, 0) for m in g_matches], dtype=bool)
        lex, _ = batch_lexical(index, data.texts, profiles)
        g_ids = emb.token_ids(g_texts)
        ids = emb.token_ids(data.texts) + [g_ids[i] for i in np.flatnonzero(keep)]
        full = np.concatenate([emb.encode(data.texts), g_full[keep]])
        static = np.concatenate([emb.static_from_ids(ids[: len(data.texts)]), g_static[keep]])
        lex_all = np.concatenate([lex[:, 0], g_lex[keep, 0]])
        n_groups = int(data.groups.max(initial=-1)) + 1
        # The target's own names are the alias features' job (with context): not word pieces.
        variants = [v for a in spec.aliases for v in alias_variants(a)]
        alias_ids = np.unique(np.concatenate([*emb.token_ids(variants), np.zeros(0)]))
        keep_cols = np.ones(emb.vocab_size, dtype=np.float32)
        keep_cols[alias_ids.astype(np.int64)] = 0.0
        bow = sparse.csr_matrix(bag_of_pieces(ids, emb.vocab_size) @ sparse.diags(keep_cols))
        bow.eliminate_zeros()
        # Fit only the word pieces that occur (a few thousand of 30k): much faster L-BFGS.
        cols = np.unique(bow.indices)
        bow = sparse.csr_matrix(bow[:, cols])
        return _Design(
            texts=data.texts + [g_texts[i] for i in np.flatnonzero(keep)],
            y=np.concatenate([data.y, np.zeros(int(keep.sum()), dtype=int)]),
            kinds=np.concatenate([data.kinds, g_kinds[keep]]),
            groups=np.concatenate([data.groups, n_groups + np.flatnonzero(keep)]),
            ids=ids,
            static=static,
            full=full,
            lex=lex_all,
            x_static=self._stack(static, lex_all, bow),
            x_full=self._stack(full, lex_all, bow if cfg.full_bow else None),
            cols=cols,
        )

    def _gate(self, d: _Design, oof_static: np.ndarray, flagged_full: np.ndarray) -> float:
        """Stage-1 logit above which a prompt without alias cues goes on to stage 2."""
        cfg = self.config
        cues = names_target(d.lex)  # these always go on
        wanted = (d.y == 1) & flagged_full & ~cues
        if wanted.any():  # pass `gate_recall` of what stage 2 flags without alias cues
            return float(np.quantile(oof_static[wanted], 1.0 - cfg.gate_recall)) - cfg.gate_margin
        # Stage 2 flagged nothing without alias cues: pass only what beats every such negative.
        others = (d.y == 0) & ~cues
        return float(oof_static[others].max()) if others.any() else float("inf")

    @staticmethod
    def _profiles(spec: TargetSpec, index: AliasIndex) -> tuple[tuple[str, ...], ...]:
        """Detail terms of the forget examples that name nobody (their details identify them)."""
        unnamed = [ex for ex in spec.forget_examples if not index.spans(ex)]
        return tuple(p for p in map(detail_terms, unnamed) if p)

    def _cross_fit(self, d: _Design) -> tuple[np.ndarray, np.ndarray]:
        """Out-of-fold logits of both heads (folds grouped by source example)."""
        folds = _assign_folds(d.groups, self.config.folds, self.config.seed)
        oof_static = np.zeros(len(d.y))
        oof_full = np.zeros(len(d.y))
        for f in range(self.config.folds):
            tr, te = np.flatnonzero(folds != f), np.flatnonzero(folds == f)
            ids_te = [d.ids[i] for i in te]
            head = self._fit(d.x_static[tr], d.y[tr], d.cols)
            oof_static[te] = head.logits(d.static[te], d.lex[te], ids_te)
            head = self._fit(d.x_full[tr], d.y[tr], d.cols)
            oof_full[te] = head.logits(d.full[te], d.lex[te], ids_te)
        return oof_static, oof_full

    def train(self, spec: TargetSpec) -> TargetClassifier:
        """Train and calibrate a classifier for `spec`."""
        t0 = time.perf_counter()
        cfg = self.config
        index = AliasIndex(
            [spec.aliases],
            common_words=self.embedder.vocabulary_words(),
            name_words=load_lexicon().name_words,
        )
        d = self._assemble(spec, index)
        profiles = self._profiles(spec, index)
        flags = _alias_flags(spec, index)
        oof_static, oof_full = self._cross_fit(d)
        neg, pos = d.y == 0, d.y == 1
        threshold = grouped_threshold(oof_full[neg], d.kinds[neg], cfg.fpr)
        gate = self._gate(d, oof_static, oof_full > threshold)
        passed = (oof_static > gate) | names_target(d.lex)
        named = np.array([named_in_full(index.match(t), 0, flags.__getitem__) for t in d.texts])
        flagged = (passed & (oof_full > threshold)) | named
        static_head = self._fit(d.x_static, d.y, d.cols)
        full_head = self._fit(d.x_full, d.y, d.cols)
        seconds = time.perf_counter() - t0

        def by_kind(mask: np.ndarray) -> dict[str, float]:
            return {
                str(k): float(mask[neg & (d.kinds == k)].mean()) for k in np.unique(d.kinds[neg])
            }

        report = CalibrationReport(
            fpr_target=cfg.fpr,
            threshold=float(sigmoid(threshold)),
            heldout_recall=float(flagged[pos].mean()),
            heldout_fpr=float(flagged[neg].mean()),
            heldout_fpr_by_kind=by_kind(flagged),
            gate_threshold=float(sigmoid(gate)),
            gate_recall=float(passed[pos].mean()),
            gate_pass_rate=by_kind(passed),
            n_pos=int(pos.sum()),
            n_neg=int(neg.sum()),
            folds=cfg.folds,
            train_seconds=seconds,
            notes=(
                "cross-fitted (grouped K-fold) scores, conformal quantile per negative kind; "
                "recall on examples that name nobody is optimistic (their details are in the "
                "profile)"
            ),
        )
        logger.info("trained target %s in %.1f s: %s", spec.name, seconds, report)
        return TargetClassifier(
            name=spec.name,
            aliases=tuple(spec.aliases),
            part_weights=index.target_weights(0),
            static_head=static_head,
            full_head=full_head,
            gate_logit=gate,
            threshold_logit=threshold,
            report=report,
            embedder_fingerprint=self.embedder.fingerprint,
            meta={"config": dict(self.config.__dict__)},
            detail_profiles=profiles,
            alias_flags=flags,
        )

    def _general(self) -> tuple[list[str], np.ndarray]:
        """The shipped negatives, or a fixed subset of `max_general` of them."""
        general = general_negatives()
        order = np.arange(len(general.texts))
        if self.config.max_general is not None:
            # The same subset for every target and seed, so its embeddings stay cached.
            order = np.sort(np.random.default_rng(0).permutation(order)[: self.config.max_general])
        return [general.texts[i] for i in order], np.array(general.kinds)[order]

    def _stack(
        self, emb: np.ndarray, lex: np.ndarray, bow: sparse.csr_matrix | None
    ) -> sparse.csr_matrix:
        cfg = self.config
        dense = sparse.csr_matrix(np.hstack([emb, lex * cfg.lex_scale]))
        if bow is None:
            return dense
        return sparse.hstack([dense, bow * cfg.bow_scale], format="csr")

    def _fit(self, x: sparse.csr_matrix, y: np.ndarray, cols: np.ndarray) -> LinearHead:
        """Fit one logistic head and return it with weights for unscaled features."""
        cfg = self.config
        clf = LogisticRegression(C=cfg.c, class_weight="balanced", max_iter=1000, tol=1e-3)
        clf.fit(x, y)
        w = clf.coef_[0]
        h = self.embedder.dim
        w_bow = np.zeros(self.embedder.vocab_size, dtype=np.float32)
        if x.shape[1] > h + N_LEXICAL:
            w_bow[cols] = w[h + N_LEXICAL :] * cfg.bow_scale
        return LinearHead(
            w_emb=w[:h].astype(np.float32),
            w_lex=(w[h : h + N_LEXICAL] * cfg.lex_scale).astype(np.float32),
            w_bow=w_bow,
            bias=float(clf.intercept_[0]),
        )


def _alias_flags(spec: TargetSpec, index: AliasIndex) -> tuple[bool, ...]:
    """Per alias: does naming it in full flag a prompt by itself? Not when one of the operator's
    retain examples names it too (then only the classifier decides)."""
    kept = {m.alias for text in spec.retain_examples for m in index.match(text) if m.full}
    return tuple(a not in kept for a in range(len(spec.aliases)))


def _assign_folds(groups: np.ndarray, k: int, seed: int) -> np.ndarray:
    unique = np.unique(groups)
    perm = np.random.default_rng(seed).permutation(len(unique))
    fold_of = dict(zip(unique.tolist(), (perm % k).tolist(), strict=True))
    return np.array([fold_of[g] for g in groups.tolist()])


def warm_up(
    embedder: Embedder, config: TrainConfig | None = None, stop: threading.Event | None = None
) -> None:
    """Embed the shipped negatives now (seconds, once per process) so that training is quick.

    Setting `stop` ends it early with EncodingStopped (nothing is cached then)."""
    texts, _ = TargetTrainer(embedder, config)._general()
    embedder.encode_corpus(f"general/{len(texts)}", texts, stop)


def train_target(
    spec: TargetSpec, embedder: Embedder, config: TrainConfig | None = None
) -> TargetClassifier:
    """Augment, add hard negatives, fit and calibrate a classifier for one target."""
    return TargetTrainer(embedder, config).train(spec)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: train one target and write its artifact."""
    p = argparse.ArgumentParser(prog="python -m classifier.train", description=__doc__)
    p.add_argument("--name", required=True)
    p.add_argument("--alias", action="append", default=[])
    p.add_argument("--example", action="append", default=[], help="a forget example prompt")
    p.add_argument("--retain", action="append", default=[], help="a prompt to keep answering")
    p.add_argument("--description", default="")
    p.add_argument("--fpr", type=float, default=TrainConfig.fpr)
    p.add_argument("--seed", type=int, default=TrainConfig.seed)
    p.add_argument("--model-path", default=None, help="local all-MiniLM-L6-v2 folder")
    p.add_argument("--out", required=True, help="artifact file to write")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    spec = TargetSpec(args.name, args.alias, args.example, args.retain, args.description)
    clf = train_target(spec, Embedder(args.model_path), TrainConfig(fpr=args.fpr, seed=args.seed))
    with open(args.out, "wb") as f:
        f.write(clf.to_bytes())
    sys.stdout.write(json.dumps(clf.report.to_dict(), indent=2) + "\n")
    return 0 if math.isfinite(clf.threshold_logit) else 1


if __name__ == "__main__":
    raise SystemExit(main())
