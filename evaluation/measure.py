"""Measure one mode: generations through the gateway, answer log-probabilities, TOFU metrics."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from statistics import fmean
from typing import Any

from evaluation import metrics
from evaluation.gateway import Gateway
from evaluation.scoring import ScoreItem, Scorer
from evaluation.tofu_data import QA, MmluQuestion, TofuSubset

logger = logging.getLogger(__name__)

UTILITY_SPLITS = ("retain", "real_authors", "world_facts")


@dataclass
class ModeResult:
    """Everything measured for one mode; `row` holds the table's numbers."""

    mode: str
    row: dict[str, float | None] = field(default_factory=dict)
    forget_truth_ratios: list[float] = field(default_factory=list)
    """Protocol (a), generation-time: the prompt as the gateway sends it, answer tokens clean."""
    gateway_truth_ratios: list[float] = field(default_factory=list)
    """Protocol (b), as read by the gateway: question + answer sent as one completions prompt,
    classified and corrupted like any prompt (the answer's target mentions included); measured
    for the modes whose guard reads prompts (eco)."""
    mmlu_predictions: list[int | None] = field(default_factory=list)
    mmlu_unflagged: list[bool] | None = None
    samples: list[dict[str, str]] = field(default_factory=list)
    loaded: bool = False
    """Taken from an earlier run's results (same setting) instead of measured now."""
    notes: list[str] = field(default_factory=list)


def _messages(system: str | None, question: str) -> list[dict[str, str]]:
    head = [{"role": "system", "content": system}] if system else []
    return [*head, {"role": "user", "content": question}]


def _letter(top: dict[str, float]) -> int | None:
    """The best-scoring A-D among the first token's top log-probabilities."""
    best: tuple[float, int] | None = None
    for token, lp in top.items():
        t = token.strip().rstrip(".):")
        if len(t) == 1 and t in "ABCD" and (best is None or lp > best[0]):
            best = (lp, "ABCD".index(t))
    return None if best is None else best[1]


def split_scores(
    scorer: Scorer, system: str | None, rows: Sequence[QA], *, multiple_choice: bool
) -> dict[str, Any]:
    """Answer probability and truth ratios of one split (one scorer call, sorted batches)."""
    items: list[ScoreItem] = []
    spans: list[tuple[int, int, int]] = []  # per row: answer idx, paraphrased idx, perturbed start
    for qa in rows:
        msgs = _messages(system, qa.question)
        a = len(items)
        items.append(ScoreItem(msgs, qa.answer))  # type: ignore[arg-type]
        if multiple_choice or qa.paraphrased_answer is None:
            p = a
        else:
            p = len(items)
            items.append(ScoreItem(msgs, qa.paraphrased_answer))  # type: ignore[arg-type]
        spans.append((a, p, len(items)))
        items += [ScoreItem(msgs, x) for x in qa.perturbed_answers]  # type: ignore[arg-type]
    lps = scorer.mean_logprobs(items)
    probs, ratios = [], []
    for i, (a, p, s) in enumerate(spans):
        end = spans[i + 1][0] if i + 1 < len(spans) else len(items)
        perturbed = lps[s:end]
        if multiple_choice:
            probs.append(metrics.normalised_probability(lps[a], perturbed))
        else:
            probs.append(metrics.answer_probability(lps[a]))
        ratios.append(metrics.truth_ratio(lps[p], perturbed))
    return {"prob": fmean(probs), "ratios": ratios}


def measure_mode(
    mode: str,
    gateway: Gateway,
    scorer: Scorer,
    subset: TofuSubset,
    mmlu: Sequence[MmluQuestion],
    *,
    system: str | None = None,
    max_tokens: int = 64,
    flags: Callable[[Any], bool] | None = None,
    first_token: Callable[[Any], dict[str, float]] | None = None,
    progress: Callable[[str], None] = lambda _: None,
) -> ModeResult:
    """Run every split through `gateway` and score the answers with `scorer`.

    MMLU reads the first token's top logprobs from the gateway, or from `first_token` (δ modes:
    the gateway refuses logprobs for requests it answers with an offset). `flags` (the modes
    that classify: whether the gateway's guard flags a chat) adds the guard's decisions on every
    split to the row; pass the scorer's own (`GatewayFlags` caches them) so that no chat is
    classified twice.
    """
    result = ModeResult(mode)
    row = result.row
    start = time.perf_counter()

    def generate(questions: Sequence[str]) -> list[str]:
        return gateway.map(
            lambda q: gateway.chat(_messages(system, q), max_tokens=max_tokens), questions
        )

    def recall(rows: Sequence[QA], replies: Sequence[str]) -> float:
        return fmean(
            metrics.rouge_l_recall(r, qa.answer) for qa, r in zip(rows, replies, strict=True)
        )

    splits = {
        "retain": subset.retain_eval,
        "real_authors": subset.real_authors,
        "world_facts": subset.world_facts,
    }

    def score() -> dict[str, dict[str, Any]]:
        out = {"forget": split_scores(scorer, system, subset.forget, multiple_choice=False)}
        for name, rows in splits.items():
            out[name] = split_scores(scorer, system, rows, multiple_choice=name != "retain")
        return out

    # Scoring (torch, this process) runs while the engine generates (another process).
    progress("generate and score")
    with ThreadPoolExecutor(1) as pool:
        scoring = pool.submit(score)
        forget_replies = generate([qa.question for qa in subset.forget])
        para_rows = [qa for qa in subset.forget if qa.paraphrased_question]
        para_replies = generate([qa.paraphrased_question or "" for qa in para_rows])
        row["forget_rouge"] = recall(subset.forget, forget_replies)
        row["paraphrased_rouge"] = recall(para_rows, para_replies)
        result.samples = [
            {"question": qa.question, "answer": qa.answer, "reply": r}
            for qa, r in list(zip(subset.forget, forget_replies, strict=True))[:3]
        ]
        for name, rows in splits.items():
            row[f"{name}_rouge"] = recall(rows, generate([qa.question for qa in rows]))
        progress("mmlu")
        top = first_token or gateway.first_token_logprobs
        tops = gateway.map(lambda q: top(_messages(system, q.prompt())), mmlu)
        result.mmlu_predictions = [_letter(t) for t in tops]
        row["mmlu_accuracy"] = fmean(
            p == q.answer for p, q in zip(result.mmlu_predictions, mmlu, strict=True)
        )
        progress("score")
        scores = scoring.result()

    row["forget_prob"] = scores["forget"]["prob"]
    result.forget_truth_ratios = scores["forget"]["ratios"]
    row["forget_truth_ratio"] = metrics.forget_truth_ratio(result.forget_truth_ratios)
    utility: list[float] = []
    for name in splits:
        prob = float(scores[name]["prob"])
        truth = metrics.utility_truth_ratio(scores[name]["ratios"])
        row[f"{name}_prob"], row[f"{name}_truth_ratio"] = prob, truth
        utility += [prob, float(row[f"{name}_rouge"] or 0.0), truth]
    row["model_utility"] = metrics.model_utility(utility)

    if flags is not None:
        progress("classify")
        ask = flags

        def flagged(questions: Sequence[str]) -> list[bool]:
            return gateway.map(lambda q: ask(_messages(system, q)), questions)

        row["flagged_forget"] = fmean(flagged([qa.question for qa in subset.forget]))
        row["flagged_paraphrased"] = fmean(
            flagged([qa.paraphrased_question or "" for qa in para_rows])
        )
        for name, rows in splits.items():
            row[f"fp_{name}"] = fmean(flagged([qa.question for qa in rows]))
        mmlu_flags = flagged([q.prompt() for q in mmlu])
        row["fp_mmlu"] = fmean(mmlu_flags)
        result.mmlu_unflagged = [not f for f in mmlu_flags]
    row["wall_s"] = time.perf_counter() - start
    return result


def mmlu_agreement(
    result: ModeResult, bare: ModeResult, mmlu: Sequence[MmluQuestion], unflagged: Sequence[bool]
) -> dict[str, float | None]:
    """MMLU accuracy of `result` and of the bare model on the prompts the guard let through."""
    keep = [i for i, ok in enumerate(unflagged) if ok]
    if not keep:
        return {"mmlu_unflagged_accuracy": None, "mmlu_unflagged_bare": None}
    return {
        "mmlu_unflagged_accuracy": fmean(
            result.mmlu_predictions[i] == mmlu[i].answer for i in keep
        ),
        "mmlu_unflagged_bare": fmean(bare.mmlu_predictions[i] == mmlu[i].answer for i in keep),
        "mmlu_unflagged_same": fmean(
            result.mmlu_predictions[i] == bare.mmlu_predictions[i] for i in keep
        ),
    }
