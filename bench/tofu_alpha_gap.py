"""The strength search's objective read on forget05: would it choose δ's α?

ECO's registration chooses a strength by an answer-preference gap (corruption/strength.py):

    gap = mean over questions of [ LL(true answer | question) - mean_j LL(answer_j | question) ]

LL the mean per-token log-likelihood, answer_j the answers of 3 other forget authors' questions
at the same position, and the level to reach is the gap with the target's name deleted from the
question. This scores that gap on forget05 for delta+npo at each `--alphas` value (big = small
base = the target fine-tune, as `obliviate eval tofu` serves it), for the target with the name
deleted or replaced by another forget author's, and for the reference with and without the name,
from the cached models of a committed run. An α rule without a reference would read it; whether
it lands where the truth ratios match the reference's (bench/tofu_alpha.py) is the question.

    flock /tmp/obliviate-heavy.lock python bench/tofu_alpha_gap.py \\
        [--alphas 1 1.25 1.5 1.75 2] [--results docs/results/tofu-forget05.json] [--limit N]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.tofu_alpha import AlphaRun, cached_reference  # noqa: E402
from evaluation.scoring import AnswerScorer, ScoreItem, load_model  # noqa: E402
from evaluation.tofu_data import QA, QUESTIONS_PER_AUTHOR  # noqa: E402

OTHERS = 3
"""Unrelated answers per question, as the strength search's objective uses."""


def delete(question: str, name: str) -> str:
    """The question without the author's name (full, surname or first name alone)."""
    parts = name.split()
    out = question.replace(name, "")
    for part in (parts[-1], parts[0]):
        out = re.sub(rf"\b{re.escape(part)}\b", "", out)
    return re.sub(r"\s+([?,.'])", r"\1", re.sub(r"\s{2,}", " ", out)).strip()


def swap(question: str, name: str, other: str) -> str:
    """The question about `other` instead (full name, then surname alone)."""
    out = question.replace(name, other)
    return re.sub(rf"\b{re.escape(name.split()[-1])}\b", other.split()[-1], out)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--alphas", type=float, nargs="+", default=[1.0, 1.25, 1.5, 1.75, 2.0])
    parser.add_argument("--results", type=Path, default=Path("docs/results/tofu-forget05.json"))
    parser.add_argument("--out", type=Path, default=Path("bench/results/tofu_alpha_gap.json"))
    parser.add_argument("--reference", type=Path, default=None, help="reference fine-tune")
    parser.add_argument("--limit", type=int, default=None, help="first N questions (smoke run)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch
    from transformers import AutoTokenizer

    torch.set_num_threads(args.threads)
    ar = AlphaRun.load(args.results)
    rows: list[QA] = list(ar.subset.forget)
    names = ar.subset.author_names
    target_dir, npo_dir = ar.target_dir, ar.npo_dir
    reference_dir = args.reference or cached_reference(ar.run, target_dir)
    tokenizer = AutoTokenizer.from_pretrained(target_dir, local_files_only=True)
    target, npo, reference = (load_model(d) for d in (target_dir, npo_dir, reference_dir))

    def name_of(i: int) -> str:
        return names[i // QUESTIONS_PER_AUTHOR]

    def items(question_of: Callable[[int, QA], str]) -> list[ScoreItem]:
        out = []
        for i, qa in enumerate(rows[: args.limit]):
            messages = [{"role": "user", "content": question_of(i, qa)}]
            out.append(ScoreItem(messages, qa.answer))  # type: ignore[arg-type]
            for k in range(1, OTHERS + 1):  # the same position, other authors
                j = (i + k * QUESTIONS_PER_AUTHOR) % len(rows)
                out.append(ScoreItem(messages, rows[j].answer))  # type: ignore[arg-type]
        return out

    def gaps(scorer: AnswerScorer, batch: list[ScoreItem]) -> list[float]:
        lps = scorer.mean_logprobs(batch)
        step = OTHERS + 1
        return [lps[i] - statistics.fmean(lps[i + 1 : i + step]) for i in range(0, len(lps), step)]

    plain = items(lambda i, qa: qa.question)
    deleted = items(lambda i, qa: delete(qa.question, name_of(i)))
    swapped = items(
        lambda i, qa: swap(
            qa.question, name_of(i), names[(i // QUESTIONS_PER_AUTHOR + 1) % len(names)]
        )
    )
    runs: list[tuple[str, list[tuple[Any, float]], list[ScoreItem]]] = [
        ("reference", [(reference, 1.0)], plain),
        ("reference, name deleted", [(reference, 1.0)], deleted),
        ("target", [(target, 1.0)], plain),
        ("target, name deleted", [(target, 1.0)], deleted),
        ("target, another forget author's name", [(target, 1.0)], swapped),
    ] + [(f"delta+npo, alpha {a:g}", [(target, 1.0 - a), (npo, a)], plain) for a in args.alphas]
    by_run: dict[str, list[float]] = {}
    seconds: dict[str, float] = {}
    for key, terms, batch in runs:
        started = time.perf_counter()
        by_run[key] = gaps(AnswerScorer(tokenizer, terms), batch)
        seconds[key] = time.perf_counter() - started
        print(
            f"{key}: mean gap {statistics.fmean(by_run[key]):.3f}, {seconds[key]:.0f} s", flush=True
        )  # noqa: T201
    reference_gaps = by_run["reference"]
    report = {
        "results": str(args.results),
        "questions": len(reference_gaps),
        "questions_naming_their_author": sum(
            name_of(i).split()[-1] in qa.question for i, qa in enumerate(rows[: args.limit])
        ),
        "summary": {
            key: {
                "mean_gap": statistics.fmean(v),
                "median_gap": statistics.median(v),
                "share_below_reference": sum(a < b for a, b in zip(v, reference_gaps, strict=True))
                / len(v),
            }
            for key, v in by_run.items()
        },
        "seconds": seconds,
        "gaps": by_run,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps(report["summary"], indent=1))  # noqa: T201


if __name__ == "__main__":
    main()
