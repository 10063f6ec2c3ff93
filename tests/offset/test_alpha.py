"""offset.alpha: δ's α matched to the served model's truth ratios on invented entities."""

from __future__ import annotations

import math
from statistics import NormalDist

import pytest
import torch

from offset.alpha import ALPHAS, RatioItem, choose_alpha, truth_ratios
from tests.offset.conftest import tiny_llama


def _lognormal(mu: float, n: int) -> list[float]:
    """n ratios whose logs are the quantiles of N(mu, 0.4²): no sampling noise."""
    return [math.exp(NormalDist(mu, 0.4).inv_cdf((i + 0.5) / n)) for i in range(n)]


def test_the_alpha_whose_ratios_match_the_level_is_chosen() -> None:
    # The level sits at median log R = -0.2; α moves the examples' ratios from -1.5 upwards
    # by 0.5 per unit of α: α = 2.5 lands on it, α = 4 overshoots.
    level = _lognormal(-0.2, 40)
    by_alpha = {a: _lognormal(-1.45 + 0.5 * a, 30) for a in ALPHAS}
    choice = choose_alpha(level, by_alpha)
    assert choice.alpha == 2.5
    assert choice.by_alpha[choice.alpha]["ks_p"] > 0.05
    assert choice.by_alpha[1.0]["ks_p"] < 1e-4 and choice.by_alpha[4.0]["ks_p"] < 1e-4
    assert choice.level_median_log_r == pytest.approx(-0.2, abs=1e-3)
    assert set(choice.report()["by_alpha"]) == {str(a) for a in ALPHAS}


def test_ties_go_to_the_nearest_median_then_the_smaller_alpha() -> None:
    # Five examples against many probes: two sets that fall between the same probes have the
    # same KS p-value; the median nearer the level's breaks the tie; equal ratios leave the
    # smaller α.
    level = [math.exp(x / 10) for x in range(-20, 21)]  # log R from -2 to 2, median 0
    near = [math.exp(x) for x in (-0.25, -0.15, -0.05, 0.05, 0.15)]
    far = [math.exp(x) for x in (-0.29, -0.19, -0.09, 0.01, 0.11)]
    choice = choose_alpha(level, {1.0: far, 1.5: near, 2.0: near})
    assert choice.by_alpha[1.0]["ks_p"] == choice.by_alpha[1.5]["ks_p"]  # the premise
    assert choice.alpha == 1.5
    with pytest.raises(ValueError):
        choose_alpha([], {1.0: near})


def test_truth_ratios_under_each_alpha_are_those_of_the_mixed_logits() -> None:
    """(1 - α) · base + α · unlearned, each α from one pass; R from per-token means."""
    base, unlearned = tiny_llama(), tiny_llama(seed=1)
    items = [
        RatioItem([5, 9, 14, 3], [7, 8], [[11, 2, 40], [6]]),
        RatioItem([1, 3], [30, 31, 32], [[4, 4]]),
    ]
    got = truth_ratios(unlearned, base, items, [0.0, 0.5, 2.0])
    for alpha, ratios in got.items():
        for item, ratio in zip(items, ratios, strict=True):
            means = []
            for answer in (item.answer_ids, *item.wrong_ids):
                ids = torch.tensor([[*item.prompt_ids, *answer]])
                with torch.inference_mode():
                    logits = (1 - alpha) * base(input_ids=ids).logits[0] + alpha * unlearned(
                        input_ids=ids
                    ).logits[0]
                lps = logits.log_softmax(-1)[len(item.prompt_ids) - 1 : -1]
                means.append(float(lps.gather(-1, torch.tensor(answer)[:, None]).mean()))
            want = math.exp(sum(means[1:]) / len(means[1:]) - means[0])
            assert ratio == pytest.approx(want, rel=1e-4), alpha
    assert truth_ratios(None, base, items, [0.0])[0.0] == pytest.approx(got[0.0], rel=1e-6)
    with pytest.raises(ValueError, match="unlearned"):
        truth_ratios(None, base, items, [1.0])
    with pytest.raises(ValueError, match="wrong answer"):
        truth_ratios(unlearned, base, [RatioItem([1], [2], [])], [1.0])


def test_the_interval_narrows_with_more_examples_and_probes() -> None:
    """The record's 80% bootstrap interval is what tells an operator to give more examples."""

    def width(n: int) -> float:
        level = _lognormal(-0.2, n)
        choice = choose_alpha(level, {a: _lognormal(-1.45 + 0.5 * a, n) for a in ALPHAS})
        assert choice.interval is not None and choice.alpha == 2.5
        low, high = choice.interval
        assert low <= choice.alpha <= high
        return high - low

    few, many = width(8), width(80)
    assert few >= 1.0 and many <= 0.5, (few, many)
    assert choose_alpha([1.0], {1.0: [1.0]}, resamples=0).interval is None
