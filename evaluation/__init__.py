"""TOFU efficacy evaluation of obliviate's modes (`obliviate eval tofu`)."""

from evaluation.finetune import FinetuneConfig, finetune
from evaluation.metrics import (
    answer_probability,
    forget_quality,
    forget_truth_ratio,
    model_utility,
    normalised_probability,
    rouge_l_recall,
    truth_ratio,
    utility_truth_ratio,
)
from evaluation.runner import TofuEvalConfig, run_tofu

__all__ = [
    "FinetuneConfig",
    "TofuEvalConfig",
    "answer_probability",
    "finetune",
    "forget_quality",
    "forget_truth_ratio",
    "model_utility",
    "normalised_probability",
    "rouge_l_recall",
    "run_tofu",
    "truth_ratio",
    "utility_truth_ratio",
]
