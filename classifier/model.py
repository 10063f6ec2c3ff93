"""A trained forget target: two linear heads, calibrated thresholds, safe serialisation."""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import sklearn

from .calibrate import CalibrationReport, sigmoid
from .embed import Embedder
from .features import FEATURE_VERSION, LinearHead, batch_lexical
from .lexicon import load_lexicon
from .spans import AliasIndex

logger = logging.getLogger(__name__)

_MAGIC = b"OBLVCLF1"
_FORMAT_VERSION = 1
LABELS = ("other", "forget")


def build_index(targets: Sequence[TargetClassifier], embedder: Embedder) -> AliasIndex:
    """One alias matcher over several trained targets, as used at serving time."""
    return AliasIndex(
        [t.aliases for t in targets],
        common_words=embedder.vocabulary_words(),
        name_words=load_lexicon().name_words,
        weights=[t.part_weights for t in targets],
    )


class ArtifactError(ValueError):
    """A serialised classifier is malformed, tampered with, or from an incompatible version."""


@dataclass(frozen=True)
class TargetSpec:
    """What to forget: a name, the names it goes by, and example prompts about it."""

    name: str
    aliases: Sequence[str]
    forget_examples: Sequence[str]
    retain_examples: Sequence[str] = ()
    description: str = ""

    def __post_init__(self) -> None:
        for attr in ("aliases", "forget_examples", "retain_examples"):
            value = getattr(self, attr)
            if isinstance(value, str):
                raise TypeError(f"{attr} must be a list of strings, not a string")
            object.__setattr__(self, attr, tuple(s for s in value if s.strip()))
        if not self.name.strip():
            raise ValueError("a target needs a name")
        if not self.forget_examples and not self.aliases:
            raise ValueError("a target needs forget examples or aliases")


@dataclass(frozen=True, eq=False)
class TargetClassifier:
    """Stage 1 (static embeddings + aliases) gates stage 2 (MiniLM + aliases); logits inside."""

    name: str
    aliases: tuple[str, ...]
    part_weights: Mapping[str, float]
    static_head: LinearHead
    full_head: LinearHead
    gate_logit: float
    threshold_logit: float
    report: CalibrationReport
    embedder_fingerprint: str
    meta: Mapping[str, Any] = field(default_factory=dict)
    detail_profiles: tuple[tuple[str, ...], ...] = ()
    alias_flags: tuple[bool, ...] = ()
    """alias_flags[i]: a prompt naming alias i in full is flagged whatever its score (False when
    the operator's retain examples name it too). Empty: every alias flags (older artifacts)."""

    def flags_alias(self, alias: int) -> bool:
        """Whether naming alias `alias` in full flags a prompt by itself."""
        return self.alias_flags[alias] if alias < len(self.alias_flags) else True

    @property
    def threshold(self) -> float:
        """Stage-2 probability above which a prompt is flagged."""
        return float(sigmoid(self.threshold_logit))

    @property
    def gate_threshold(self) -> float:
        """Stage-1 probability above which a prompt goes on to stage 2."""
        return float(sigmoid(self.gate_logit))

    def alias_index(self, embedder: Embedder) -> AliasIndex:
        """The alias matcher for this target alone."""
        return build_index([self], embedder)

    def scores(self, texts: Sequence[str], embedder: Embedder) -> np.ndarray:
        """Stage-2 probabilities for texts (no gate), shape (N,)."""
        lex, _ = batch_lexical(self.alias_index(embedder), texts, [self.detail_profiles])
        ids = embedder.token_ids(texts)
        return sigmoid(self.full_head.logits(embedder.encode(texts), lex[:, 0], ids))

    def static_scores(self, texts: Sequence[str], embedder: Embedder) -> np.ndarray:
        """Stage-1 probabilities for texts, shape (N,)."""
        lex, _ = batch_lexical(self.alias_index(embedder), texts, [self.detail_profiles])
        ids = embedder.token_ids(texts)
        return sigmoid(self.static_head.logits(embedder.static_from_ids(ids), lex[:, 0], ids))

    def to_bytes(self) -> bytes:
        """Serialise to a checksummed npz + JSON container (no pickle)."""
        arrays = {
            "static_w_emb": self.static_head.w_emb,
            "static_w_lex": self.static_head.w_lex,
            "static_w_bow": self.static_head.w_bow,
            "full_w_emb": self.full_head.w_emb,
            "full_w_lex": self.full_head.w_lex,
            "full_w_bow": self.full_head.w_bow,
        }
        buf = io.BytesIO()
        np.savez_compressed(
            buf, allow_pickle=False, **{k: v.astype(np.float32) for k, v in arrays.items()}
        )
        body = buf.getvalue()
        header = {
            "format_version": _FORMAT_VERSION,
            "feature_version": FEATURE_VERSION,
            "labels": list(LABELS),
            "sklearn_version": sklearn.__version__,
            "name": self.name,
            "aliases": list(self.aliases),
            "part_weights": dict(self.part_weights),
            "detail_profiles": [list(p) for p in self.detail_profiles],
            "alias_flags": list(self.alias_flags),
            "static_bias": self.static_head.bias,
            "full_bias": self.full_head.bias,
            "gate_logit": self.gate_logit,
            "threshold_logit": self.threshold_logit,
            "report": self.report.to_dict(),
            "embedder_fingerprint": self.embedder_fingerprint,
            "meta": dict(self.meta),
            "body_sha256": hashlib.sha256(body).hexdigest(),
        }
        head = json.dumps(header, sort_keys=True, allow_nan=True).encode()
        head_sha = hashlib.sha256(head).digest()
        return _MAGIC + len(head).to_bytes(8, "big") + head + head_sha + body

    @classmethod
    def from_bytes(cls, data: bytes) -> TargetClassifier:
        """Load what `to_bytes` wrote; raise ArtifactError on any mismatch or tampering."""
        if not data.startswith(_MAGIC) or len(data) < len(_MAGIC) + 8:
            raise ArtifactError("not an obliviate classifier artifact")
        n = int.from_bytes(data[8:16], "big")
        head, head_sha, body = data[16 : 16 + n], data[16 + n : 48 + n], data[48 + n :]
        if hashlib.sha256(head).digest() != head_sha:
            raise ArtifactError("header checksum mismatch: the artifact was modified")
        try:
            h = json.loads(head)
        except ValueError as e:
            raise ArtifactError("header is not valid JSON") from e
        if hashlib.sha256(body).hexdigest() != h.get("body_sha256"):
            raise ArtifactError("body checksum mismatch: the artifact was modified")
        if (
            h.get("format_version") != _FORMAT_VERSION
            or h.get("feature_version") != FEATURE_VERSION
        ):
            raise ArtifactError(f"unsupported artifact version {h.get('format_version')}")
        if tuple(h.get("labels", ())) != LABELS:
            raise ArtifactError(f"unexpected labels {h.get('labels')}")
        if h["sklearn_version"] != sklearn.__version__:
            logger.warning(
                "classifier %s trained with scikit-learn %s, running %s",
                h["name"],
                h["sklearn_version"],
                sklearn.__version__,
            )
        with np.load(io.BytesIO(body), allow_pickle=False) as z:
            a = {k: z[k] for k in z.files}
        return cls(
            name=h["name"],
            aliases=tuple(h["aliases"]),
            part_weights={k: float(v) for k, v in h["part_weights"].items()},
            static_head=_head(a, "static", h),
            full_head=_head(a, "full", h),
            gate_logit=float(h["gate_logit"]),
            threshold_logit=float(h["threshold_logit"]),
            report=CalibrationReport.from_dict(h["report"]),
            embedder_fingerprint=h["embedder_fingerprint"],
            meta=h["meta"],
            detail_profiles=tuple(tuple(p) for p in h.get("detail_profiles", ())),
            alias_flags=tuple(bool(f) for f in h.get("alias_flags", ())),
        )


def _head(arrays: Mapping[str, np.ndarray], prefix: str, header: Mapping[str, Any]) -> LinearHead:
    try:
        return LinearHead(
            arrays[f"{prefix}_w_emb"],
            arrays[f"{prefix}_w_lex"],
            arrays[f"{prefix}_w_bow"],
            float(header[f"{prefix}_bias"]),
        )
    except KeyError as e:
        raise ArtifactError(f"artifact lacks {e}") from e
