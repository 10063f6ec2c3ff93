"""Conformal thresholds on held-out negative scores, and the calibration report."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np


def conformal_threshold(negative_scores: np.ndarray, fpr: float) -> float:
    """Split-conformal threshold: a new exchangeable negative scores above it w.p. <= fpr.

    It is the ceil((n + 1)(1 - fpr))-th smallest of n held-out negative scores; +inf when there
    are too few negatives (n < (1 - fpr) / fpr) to bound the rate at all.
    """
    if not 0.0 < fpr < 1.0:
        raise ValueError(f"fpr must be in (0, 1), got {fpr}")
    scores = np.sort(np.asarray(negative_scores, dtype=np.float64))
    k = math.ceil((len(scores) + 1) * (1.0 - fpr))
    return float(scores[k - 1]) if k <= len(scores) else math.inf


def min_negatives(fpr: float) -> int:
    """The fewest held-out negatives for which `conformal_threshold` is finite."""
    return math.ceil((1.0 - fpr) / fpr)


def grouped_threshold(scores: np.ndarray, kinds: np.ndarray, fpr: float) -> float:
    """The largest conformal threshold over the pooled negatives and each kind of negative
    (general, entity, near miss, retain), so that every kind keeps its rate. A kind too small
    for `fpr` gets the tightest rate it can bound, 1 / (n + 1): its highest score."""
    thresholds = [conformal_threshold(scores, fpr)]
    for kind in np.unique(kinds):
        sel = scores[kinds == kind]
        if len(sel):
            thresholds.append(conformal_threshold(sel, max(fpr, 1.0 / (len(sel) + 1))))
    return max(thresholds)


def sigmoid(x: np.ndarray | float) -> np.ndarray:
    """Logistic function in float64 (logits to probabilities)."""
    return np.asarray(1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64))))


@dataclass(frozen=True)
class CalibrationReport:
    """What training measured on held-out (cross-fitted) data; thresholds are probabilities."""

    fpr_target: float
    threshold: float
    heldout_recall: float
    heldout_fpr: float
    heldout_fpr_by_kind: Mapping[str, float]
    gate_threshold: float
    gate_recall: float
    gate_pass_rate: Mapping[str, float]
    n_pos: int
    n_neg: int
    folds: int
    train_seconds: float
    notes: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict."""
        d = asdict(self)
        d["heldout_fpr_by_kind"] = dict(self.heldout_fpr_by_kind)
        d["gate_pass_rate"] = dict(self.gate_pass_rate)
        d["extra"] = dict(self.extra)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CalibrationReport:
        """Inverse of `to_dict`."""
        return cls(**dict(d))
