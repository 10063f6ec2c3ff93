"""δ's α chosen without a model that never saw the target.

Forget quality (TOFU) compares the truth ratios of questions about the target with those of a
model never trained on it. An operator has no such model, but the served model itself never saw
invented entities: its truth ratios on questions about them, with answers written the same way,
are a "never saw the data" level it can produce alone (on TOFU, the fine-tune's ratios on
fictitious authors outside its training matched the reference model's on the forget authors,
KS p = 0.71; `bench/tofu_alpha_unseen.py`). The α chosen is the one whose truth ratios on the
target's questions come nearest that level:

    level      = R(probe) under the small base, for questions about invented entities
    R_α(item)  = R(item) under (1 - α) · base + α · unlearned    (δ with big = the small base)
    α*         = argmax_α KS p(R_α, level); ties: median log R nearest the level's, then lower α

with the 80% interval of α* over bootstrap resamples of examples and probes beside it. The
choice is only as good as the number of examples: on TOFU forget05 (bench/tofu_alpha_auto.py)
it picks the best α of the grid from 200 questions, but from 10 its choices spread over
0.75-2.25.

R = exp(mean_j lp(wrong_j) - lp(answer)) with lp the per-token mean log-probability of an answer
after the templated question (TOFU's truth ratio; below 1 when the given answer is preferred).
Every α is scored from one pass of each model (`corruption.likelihood.mixed_token_logprobs`).
"""

from __future__ import annotations

import logging
import math
import random
import statistics
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import fmean
from typing import Any

import torch
from scipy.stats import ks_2samp

from corruption.likelihood import mixed_token_logprobs

logger = logging.getLogger(__name__)

ALPHAS = tuple(round(0.25 * k, 2) for k in range(1, 17))
"""The α grid searched: 0.25 to 4 in steps of 0.25."""

LOG_RATIO_BOUND = 700.0
"""|log R| is capped here: exp(±700) is still a float (exp(710) overflows, exp(-745) is 0)."""


@dataclass(frozen=True)
class RatioItem:
    """A question (its templated prompt's token ids), the answer it is scored for, and answers
    that a model without the knowledge would give as readily (token ids each)."""

    prompt_ids: Sequence[int]
    answer_ids: Sequence[int]
    wrong_ids: Sequence[Sequence[int]]


@dataclass(frozen=True)
class AlphaChoice:
    alpha: float
    level_median_log_r: float
    by_alpha: dict[float, dict[str, float]]  # α -> ks_p, median_log_r
    interval: tuple[float, float] | None = None
    """10th and 90th percentile of the α chosen on bootstrap resamples of the examples and the
    probes: how far another handful of examples could have moved the choice."""

    def report(self) -> dict[str, Any]:
        return {
            "alpha": self.alpha,
            "interval_80": list(self.interval) if self.interval else None,
            "level_median_log_r": self.level_median_log_r,
            "by_alpha": {str(a): v for a, v in self.by_alpha.items()},
        }


def truth_ratio(answer_lp: float, wrong_lps: Sequence[float]) -> float:
    """R = exp(mean_j lp(wrong_j) - lp(answer)); below 1 when the answer is preferred.

    A model can put (almost) all its mass on one side: an answer scored at -inf, or a
    difference of hundreds of nats per token. R is then capped at exp(±LOG_RATIO_BOUND), which
    every score reads as "fully preferred" and which keeps the order the KS test needs, instead
    of overflowing or dividing by zero.
    """
    if not wrong_lps:
        raise ValueError("the truth ratio needs perturbed answers")
    log_r = fmean(wrong_lps) - answer_lp
    if math.isnan(log_r):
        raise ValueError("an answer log-probability is NaN")
    if abs(log_r) > LOG_RATIO_BOUND:
        logger.warning(
            "truth ratio log %.1f capped (answer %.2f, perturbed mean %.2f nats/token)",
            log_r,
            answer_lp,
            fmean(wrong_lps),
        )
        log_r = math.copysign(LOG_RATIO_BOUND, log_r)
    return math.exp(log_r)


def truth_ratios(
    unlearned: Any,
    base: Any,
    items: Sequence[RatioItem],
    alphas: Sequence[float],
    *,
    batch_size: int = 8,
) -> dict[float, list[float]]:
    """Each item's truth ratio under (1 - α) · base + α · unlearned, for every α (0: the base
    alone; `unlearned` may then be None)."""
    if not items:
        raise ValueError("no items to score")
    models = [base] if unlearned is None else [base, unlearned]
    if unlearned is None and any(a != 0.0 for a in alphas):
        raise ValueError("α > 0 needs the unlearned model")
    mixes = [[1.0] if unlearned is None else [1.0 - a, a] for a in alphas]
    prompts = [torch.tensor(list(item.prompt_ids)) for item in items]
    continuations: list[Sequence[int]] = []
    owners: list[int] = []
    for i, item in enumerate(items):
        if not item.wrong_ids:
            raise ValueError("every item needs at least one wrong answer")
        for ids in (item.answer_ids, *item.wrong_ids):
            continuations.append(ids)
            owners.append(i)
    scores = mixed_token_logprobs(
        models, mixes, prompts, continuations, owners, batch_size=batch_size
    )
    out: dict[float, list[float]] = {}
    for alpha, per_answer in zip(alphas, scores, strict=True):
        means = iter([fmean(lps) for lps in per_answer])
        out[alpha] = []
        for item in items:
            answer_lp = next(means)
            wrong_lps = [next(means) for _ in item.wrong_ids]
            out[alpha].append(truth_ratio(answer_lp, wrong_lps))
    return out


def choose_alpha(
    level: Sequence[float],
    by_alpha: dict[float, list[float]],
    *,
    resamples: int = 200,
    seed: int = 0,
) -> AlphaChoice:
    """The α whose truth ratios are nearest the never-saw `level` (module docstring), with the
    spread of that choice over `resamples` bootstrap resamples (0: none)."""
    if not level or not by_alpha:
        raise ValueError("the choice needs the level and at least one α")
    best, level_median, table = _nearest(level, by_alpha)
    interval = None
    if resamples:
        rng = random.Random(seed)
        n_examples = len(next(iter(by_alpha.values())))
        picks = []
        for _ in range(resamples):
            probes = [level[rng.randrange(len(level))] for _ in level]
            rows = [rng.randrange(n_examples) for _ in range(n_examples)]
            resampled = {a: [ratios[i] for i in rows] for a, ratios in by_alpha.items()}
            picks.append(_nearest(probes, resampled)[0])
        picks.sort()
        interval = (picks[resamples // 10], picks[-1 - resamples // 10])
    return AlphaChoice(best, level_median, table, interval)


def _nearest(
    level: Sequence[float], by_alpha: dict[float, list[float]]
) -> tuple[float, float, dict[float, dict[str, float]]]:
    """argmax_α KS p (ties: nearest median log R, then the lower α), the level's median log R
    and the table per α."""
    level_median = statistics.median(math.log(r) for r in level)
    table: dict[float, dict[str, float]] = {}
    with warnings.catch_warnings():  # resamples repeat values: scipy's exact p falls back
        warnings.filterwarnings("ignore", "ks_2samp: Exact calculation unsuccessful")
        for alpha, ratios in sorted(by_alpha.items()):
            table[alpha] = {
                "ks_p": float(ks_2samp(list(ratios), list(level)).pvalue),
                "median_log_r": statistics.median(math.log(r) for r in ratios),
            }
    best = max(
        table,
        key=lambda a: (table[a]["ks_p"], -abs(table[a]["median_log_r"] - level_median), -a),
    )
    return best, level_median, table
