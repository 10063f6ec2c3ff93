"""TOFU metric code against values computed by hand on tiny inputs."""

from __future__ import annotations

import math

import pytest

from evaluation import metrics


def test_rouge_l_recall_is_lcs_over_reference_length() -> None:
    # LCS of the two token sequences: the, cat, on, mat -> 4 of the reference's 6 tokens.
    assert metrics.rouge_l_recall(
        "The cat lay on a mat.", "the cat sat on the mat"
    ) == pytest.approx(4 / 6)
    assert metrics.rouge_l_recall("nothing in common", "the cat sat") == 0.0
    assert metrics.rouge_l_recall("yes, Paris, France", "Paris") == 1.0


def test_answer_probability_is_the_per_token_geometric_mean() -> None:
    lp = metrics.mean_logprob([math.log(0.5), math.log(0.125)])
    assert metrics.answer_probability(lp) == pytest.approx(0.25)
    with pytest.raises(ValueError):
        metrics.mean_logprob([])


def test_normalised_probability_over_the_options() -> None:
    p = metrics.normalised_probability(math.log(0.5), [math.log(0.25), math.log(0.25)])
    assert p == pytest.approx(0.5)


def test_truth_ratio_averages_perturbed_answers_in_log_space() -> None:
    # exp(mean(log .25, log .0625)) = .125; .125 / .5 = .25.
    ratio = metrics.truth_ratio(math.log(0.5), [math.log(0.25), math.log(0.0625)])
    assert ratio == pytest.approx(0.25)
    with pytest.raises(ValueError):
        metrics.truth_ratio(0.0, [])


def test_truth_ratio_of_a_one_sided_model_is_capped_not_an_overflow() -> None:
    # A model 800 nats/token surer of the perturbed answers (or of the paraphrase), or one that
    # scores an answer at -inf: math.exp alone overflows or gives 0 (then 1/R divides by zero).
    high = metrics.truth_ratio(-900.0, [-100.0, -100.0])
    low = metrics.truth_ratio(-1.0, [-900.0, float("-inf")])
    assert high == pytest.approx(math.exp(metrics.LOG_RATIO_BOUND))
    assert low == pytest.approx(math.exp(-metrics.LOG_RATIO_BOUND))
    assert metrics.forget_truth_ratio([high, low]) == pytest.approx(0.0, abs=1e-300)
    assert metrics.utility_truth_ratio([high, low]) == pytest.approx(0.5)
    # The cap keeps the order, so the KS test still tells the distributions apart.
    assert metrics.forget_quality([high] * 10, [low] * 10) < 0.01
    with pytest.raises(ValueError, match="NaN"):
        metrics.truth_ratio(float("nan"), [-1.0])


def test_forget_and_utility_truth_ratio_scores() -> None:
    assert metrics.forget_truth_ratio([0.25, 4.0, 1.0]) == pytest.approx((0.25 + 0.25 + 1) / 3)
    assert metrics.utility_truth_ratio([0.25, 2.0]) == pytest.approx((0.75 + 0.0) / 2)


def test_forget_quality_is_the_ks_p_value() -> None:
    same = [0.1, 0.2, 0.3, 0.4, 0.5]
    assert metrics.forget_quality(same, same) == pytest.approx(1.0)
    # Fully separated samples of 5: D = 1, exact two-sided p = 2 / C(10, 5).
    apart = [1.1, 1.2, 1.3, 1.4, 1.5]
    assert metrics.forget_quality(same, apart) == pytest.approx(2 / math.comb(10, 5))


def test_folded_forget_quality_cannot_tell_r_from_its_inverse() -> None:
    prefers_truth = [0.2, 0.25, 0.3, 0.35, 0.4]
    prefers_perturbed = [1 / r for r in prefers_truth]
    assert metrics.forget_quality(prefers_truth, prefers_perturbed) == pytest.approx(
        2 / math.comb(10, 5)
    )
    assert metrics.forget_quality_folded(prefers_truth, prefers_perturbed) == pytest.approx(1.0)
    assert metrics.forget_quality_folded(prefers_truth, [0.9, 1.0, 1.1, 0.95, 1.05]) < 0.01


def test_model_utility_is_the_harmonic_mean() -> None:
    assert metrics.model_utility([1.0, 0.5, 0.25]) == pytest.approx(3 / (1 + 2 + 4))
    assert metrics.model_utility([1.0, 0.0, 0.5]) == 0.0
