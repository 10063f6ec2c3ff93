"""δ's α without a reference model: match the target model's own truth ratios on authors it
never saw.

Forget quality compares the forget split's truth ratios with those of a reference model that was
never trained on the forget authors. An operator has no such model. But the served model itself
has never seen most fictitious authors: its truth ratios on questions about authors outside its
fine-tune are a "never saw the data" level it can produce alone. This scores the target fine-tune
(and, to check the proxy, the reference) on TOFU's forget10 authors that are neither in forget05
nor among the run's retain authors, and takes the α whose forget05 ratios (bench/tofu_alpha.py,
scope flagged) come nearest that level (KS p-value against it). Nothing in the choice reads the
reference; its forget quality is reported for the chosen α afterwards, for the whole split and
for each half of the forget authors chosen on its own (as if each were a target).

    flock /tmp/obliviate-heavy.lock python bench/tofu_alpha_unseen.py \\
        [--results docs/results/tofu-forget05.json] [--alphas docs/results/tofu-forget05-alpha.json]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.tofu_alpha import AlphaRun, cached_reference, run_subset, summary  # noqa: E402
from evaluation import metrics  # noqa: E402
from evaluation.measure import split_scores  # noqa: E402
from evaluation.scoring import AnswerScorer, load_model  # noqa: E402
from evaluation.tofu_data import QA, QUESTIONS_PER_AUTHOR, load_subset  # noqa: E402


def unseen_rows(run: dict[str, Any]) -> tuple[list[QA], list[int]]:
    """forget10's questions about authors the run's fine-tunes never saw, and those authors."""
    cfg = run["config"]
    subset = run_subset(run)
    wider = load_subset(
        Path(cfg["data_dir"]),
        "forget10",
        retain_authors=cfg["retain_authors"],
        retain_eval=cfg["retain_eval"],
        seed=cfg["seed"],
    )
    seen = set(subset.forget_authors) | set(subset.retain_authors)
    # target_train opens with the forget authors' questions, QUESTIONS_PER_AUTHOR each, in order
    opening = wider.target_train[: len(wider.forget_authors) * QUESTIONS_PER_AUTHOR]
    author_of = {
        qa.question: wider.forget_authors[i // QUESTIONS_PER_AUTHOR] for i, qa in enumerate(opening)
    }
    rows = [qa for qa in wider.forget if author_of[qa.question] not in seen]
    authors = sorted({author_of[qa.question] for qa in rows})
    if len(rows) != len(authors) * QUESTIONS_PER_AUTHOR:
        raise SystemExit("could not separate the unseen authors' questions")
    return rows, authors


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--results", type=Path, default=Path("docs/results/tofu-forget05.json"))
    parser.add_argument(
        "--alphas", type=Path, default=Path("docs/results/tofu-forget05-alpha.json")
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results/tofu_alpha_unseen.json"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch
    from transformers import AutoTokenizer

    torch.set_num_threads(args.threads)
    ar = AlphaRun.load(args.results)
    run, reference, target_dir = ar.run, ar.reference, ar.target_dir
    by_alpha = {float(a): r for a, r in json.loads(args.alphas.read_text())["ratios"].items()}
    by_alpha[0.0] = ar.none  # the target itself
    rows, authors = unseen_rows(run)
    tokenizer = AutoTokenizer.from_pretrained(target_dir, local_files_only=True)
    unseen: dict[str, list[float]] = {}
    seconds: dict[str, float] = {}
    for name, folder in (("target", target_dir), ("reference", cached_reference(run, target_dir))):
        started = time.perf_counter()
        scorer = AnswerScorer(tokenizer, [(load_model(folder), 1.0)])
        unseen[name] = split_scores(scorer, None, rows, multiple_choice=False)["ratios"]
        seconds[name] = time.perf_counter() - started
        print(name, f"{seconds[name]:.0f} s", flush=True)  # noqa: T201

    proxy = unseen["target"]
    table = {
        str(a): {
            "proxy_p": metrics.forget_quality(r, proxy),
            "forget_quality": metrics.forget_quality(r, reference),
            "median_log_r": summary(r, reference)["median_log_r"],
        }
        for a, r in sorted(by_alpha.items())
    }
    chosen = max(by_alpha, key=lambda a: metrics.forget_quality(by_alpha[a], proxy))
    # The same rule for each half of the forget authors on its own (as if each were a target):
    # an α tuned on one half against the reference did not carry to the other (tofu_alpha.py).
    half = len(reference) // (2 * QUESTIONS_PER_AUTHOR) * QUESTIONS_PER_AUTHOR
    halves = {}
    for name, part in (("first", slice(0, half)), ("second", slice(half, len(reference)))):
        pick = max(by_alpha, key=lambda a: metrics.forget_quality(by_alpha[a][part], proxy))
        fq = {a: metrics.forget_quality(r[part], reference[part]) for a, r in by_alpha.items()}
        halves[f"{name} half of the forget authors"] = {
            "chosen_alpha": pick,
            "forget_quality": fq[pick],
            "alpha_best_against_reference": max(fq, key=lambda a: fq[a]),
            "forget_quality_by_alpha": {str(a): v for a, v in sorted(fq.items())},
        }
    report = {
        "results": str(args.results),
        "unseen_authors": authors,
        "unseen_questions": len(rows),
        "median_log_r": {
            "reference on forget05": statistics.median(map(math.log, reference)),
            "target on unseen": statistics.median(map(math.log, proxy)),
            "reference on unseen": statistics.median(map(math.log, unseen["reference"])),
        },
        "proxy_against_reference": {
            "ks_p(reference on forget05, target on unseen)": metrics.forget_quality(
                reference, proxy
            ),
            "ks_p(reference on unseen, target on unseen)": metrics.forget_quality(
                unseen["reference"], proxy
            ),
        },
        "alphas": table,
        "chosen_alpha": chosen,
        "chosen_forget_quality": table[str(chosen)]["forget_quality"],
        "halves": halves,
        "seconds": seconds,
        "unseen_ratios": unseen,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k != "unseen_ratios"}, indent=1))  # noqa: T201


if __name__ == "__main__":
    main()
