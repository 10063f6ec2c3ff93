"""TOFU metrics (Maini et al., 2024), as its reference code computes them.

- probability: P(a|q)^(1/|a|), the per-token (geometric-mean) probability of the gold answer;
  on real_authors and world_facts it is normalised against the perturbed answers,
  p(a) / (p(a) + Σ p(perturbed)).
- ROUGE-L recall of the greedy generation against the gold answer (rouge-score, stemmed).
- truth ratio R = mean_j P(perturbed_j)^(1/|p_j|) / P(paraphrased)^(1/|p|), with the mean taken
  in log space as the reference code does. Reported as mean(min(R, 1/R)) on the forget set and as
  mean(max(0, 1 - R)) on the utility splits.
- forget quality: the p-value of the two-sample KS test between the raw truth ratios R of the
  forget set under the evaluated model and under the reference model (TOFU, open-unlearning).
  The ECO paper's code tests the folded ratios min(R, 1/R) instead: `forget_quality_folded`,
  reported beside it so the numbers can be set beside that paper's.
- model utility: the harmonic mean of the nine numbers (probability, ROUGE-L recall, truth ratio)
  x (retain, real_authors, world_facts).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import fmean

from rouge_score import rouge_scorer
from scipy.stats import hmean, ks_2samp

# The truth ratio is the product's own too: offset.alpha chooses δ's α with it.
from offset.alpha import LOG_RATIO_BOUND as LOG_RATIO_BOUND
from offset.alpha import truth_ratio as truth_ratio

_SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l_recall(prediction: str, reference: str) -> float:
    """ROUGE-L recall of `prediction` against `reference` (LCS / reference length)."""
    return float(_SCORER.score(reference, prediction)["rougeL"].recall)


def mean_logprob(token_logprobs: Sequence[float]) -> float:
    """Per-token mean log-probability (the log of TOFU's normalised answer probability)."""
    if not token_logprobs:
        raise ValueError("an answer has at least one token")
    return fmean(token_logprobs)


def answer_probability(mean_lp: float) -> float:
    """P(a|q)^(1/|a|) from the per-token mean log-probability."""
    return math.exp(mean_lp)


def normalised_probability(answer_lp: float, perturbed_lps: Sequence[float]) -> float:
    """p(a) / (p(a) + Σ_j p(perturbed_j)), each p per-token normalised (real authors, facts)."""
    p = math.exp(answer_lp)
    return p / (p + sum(math.exp(x) for x in perturbed_lps))


def forget_truth_ratio(ratios: Sequence[float]) -> float:
    """TOFU's forget-set truth-ratio score: mean of min(R, 1/R)."""
    return fmean(min(r, 1 / r) for r in ratios)


def utility_truth_ratio(ratios: Sequence[float]) -> float:
    """TOFU's truth-ratio score on the utility splits: mean of max(0, 1 - R)."""
    return fmean(max(0.0, 1 - r) for r in ratios)


def forget_quality(ratios: Sequence[float], reference_ratios: Sequence[float]) -> float:
    """KS-test p-value of the forget-set truth ratios against the reference model's."""
    return float(ks_2samp(list(ratios), list(reference_ratios)).pvalue)


def forget_quality_folded(ratios: Sequence[float], reference_ratios: Sequence[float]) -> float:
    """The ECO paper's forget quality: KS-test p-value on the folded ratios min(R, 1/R), which
    cannot tell "prefers the truth" from "prefers the perturbed answers" by the same factor."""
    return forget_quality(
        [min(r, 1 / r) for r in ratios], [min(r, 1 / r) for r in reference_ratios]
    )


def model_utility(values: Sequence[float]) -> float:
    """Harmonic mean of the utility numbers; 0 when any of them is 0."""
    if any(v <= 0 for v in values):
        return 0.0
    return float(hmean(list(values)))
