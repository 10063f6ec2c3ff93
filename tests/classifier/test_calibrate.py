"""Conformal thresholds keep their false-positive rate on fresh negatives."""

from __future__ import annotations

import math

import numpy as np

from classifier import conformal_threshold
from classifier.calibrate import grouped_threshold, min_negatives


def test_heldout_fpr_is_bounded_on_synthetic_scores() -> None:
    rng = np.random.default_rng(0)
    rates = []
    for _ in range(200):
        calib = rng.normal(size=500)
        fresh = rng.normal(size=5000)
        rates.append(float((fresh > conformal_threshold(calib, 0.01)).mean()))
    # Marginal guarantee: E[FPR] <= 1%; and the quantile is not needlessly loose.
    assert np.mean(rates) <= 0.0105
    assert np.mean(rates) >= 0.007


def test_too_few_negatives_give_an_infinite_threshold() -> None:
    assert min_negatives(0.01) == 99
    assert math.isinf(conformal_threshold(np.arange(50.0), 0.01))
    assert conformal_threshold(np.arange(99.0), 0.01) == 98.0


def test_every_kind_keeps_its_rate() -> None:
    rng = np.random.default_rng(1)
    easy = rng.normal(-3, 1, size=2000)
    hard = rng.normal(0, 1, size=300)
    scores = np.concatenate([easy, hard])
    kinds = np.array(["general"] * 2000 + ["near_miss"] * 300)
    thr = grouped_threshold(scores, kinds, 0.01)
    assert thr >= conformal_threshold(hard, 0.01)
    assert (hard > thr).mean() <= 0.01
    # A kind too small for the rate is held to its maximum.
    small = np.array([5.0, 1.0, 2.0])
    assert grouped_threshold(np.r_[easy, small], np.array(["g"] * 2000 + ["s"] * 3), 0.01) == 5.0
