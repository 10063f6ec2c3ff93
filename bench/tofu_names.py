"""How much of the target's preference for the true answer survives without the author's name.

ECO acts on the prompt: at best, the corrupted name tells the model nothing about who is asked
about. This measures that best case on the cached TOFU fine-tunes of an `obliviate eval tofu`
run: the forget split's truth ratios (teacher-forced, as the eval scores them) with every
mention of the forget authors in question *and* answers (protocol (b) reads both) replaced

  - `anonymised`: by "the author" (the name deleted, the sentence kept grammatical);
  - `neighbour`: by the full name of one of the retain authors (a name the model was trained on,
    with other facts: the "replaced by a neighbour's name" reference the issue proposes);

and compares them with the reference model's ratios on the unchanged questions (forget quality,
KS p-value) and the share of questions whose paraphrased true answer beats the perturbed ones.
If the target still prefers the truth with no name at all, no strength of prompt corruption can
reach the reference: the preference is carried by the memorised answers themselves.

    flock /tmp/obliviate-heavy.lock python bench/tofu_names.py --forget forget05 \
        --retain-authors 10 --data-dir ../shared/data [--results docs/results/tofu-forget05.json]

The fine-tunes must be in the eval cache (the same setting as the eval run: it reuses them).
Writes bench/results/tofu_names.json.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluation import metrics  # noqa: E402
from evaluation.config import default_eval_cache  # noqa: E402
from evaluation.finetune import FinetuneConfig, cache_key  # noqa: E402
from evaluation.measure import split_scores  # noqa: E402
from evaluation.scoring import AnswerScorer, load_model  # noqa: E402
from evaluation.sources import open_source  # noqa: E402
from evaluation.tofu_data import QA, load_subset  # noqa: E402
from server.modelstore import resolve_model  # noqa: E402


def mentions(names: list[str]) -> re.Pattern[str]:
    """Full names first, then each part of three letters or more, as whole words."""
    parts = {p for n in names for p in re.split(r"[\s-]+", n) if len(p) >= 3}
    alternatives = sorted(names, key=len, reverse=True) + sorted(parts, key=len, reverse=True)
    return re.compile(r"\b(?:" + "|".join(re.escape(a) for a in alternatives) + r")\b")


def renamed(qa: QA, pattern: re.Pattern[str], name: str) -> QA:
    def sub(text: str | None) -> str | None:
        return None if text is None else re.sub(r"\s+", " ", pattern.sub(name, text)).strip()

    return replace(
        qa,
        question=sub(qa.question) or qa.question,
        answer=sub(qa.answer) or qa.answer,
        paraphrased_answer=sub(qa.paraphrased_answer),
        perturbed_answers=tuple(sub(a) or a for a in qa.perturbed_answers),
    )


def describe(ratios: list[float], reference: list[float]) -> dict[str, float]:
    return {
        "forget_quality": metrics.forget_quality(ratios, reference),
        "forget_quality_folded": metrics.forget_quality_folded(ratios, reference),
        "median_log_ratio": statistics.median(math.log(r) for r in ratios),
        "prefer_true": sum(r < 1 for r in ratios) / len(ratios),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--forget", default="forget05")
    parser.add_argument("--retain-authors", type=int, default=10)
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench/results/tofu_names.json"))
    args = parser.parse_args()

    source = open_source(args.data_dir, default_eval_cache())
    subset = load_subset(
        source, args.forget, retain_authors=args.retain_authors, retain_eval=100, seed=args.seed
    )
    ft = FinetuneConfig(seed=args.seed)
    base = resolve_model(None, auto_pull=True)
    cache = default_eval_cache()
    folders = {
        "target": cache / f"target-{args.forget}-{cache_key(base, subset.target_train, ft)}",
        "reference": cache
        / f"reference-{args.forget}-{cache_key(base, subset.reference_train, ft)}",
    }
    for name, folder in folders.items():
        if not (folder / "config.json").is_file():
            raise SystemExit(f"no cached {name} fine-tune at {folder}: run the eval first")
    pattern = mentions(list(subset.author_names))
    neighbours = list(subset.retain_names)
    variants: dict[str, list[QA]] = {
        "names": list(subset.forget),
        "anonymised": [renamed(qa, pattern, "the author") for qa in subset.forget],
        "neighbour": [
            renamed(qa, pattern, neighbours[i % len(neighbours)])
            for i, qa in enumerate(subset.forget)
        ],
    }
    report: dict[str, Any] = {
        "forget": args.forget,
        "questions": len(subset.forget),
        "example": {k: v[0].question for k, v in variants.items()},
        "ratios": {},
    }
    from transformers import AutoTokenizer

    for model_name in ("reference", "target"):
        tokenizer = AutoTokenizer.from_pretrained(folders[model_name])
        scorer = AnswerScorer(tokenizer, [(load_model(folders[model_name]), 1.0)])
        for variant, rows in variants.items():
            started = time.perf_counter()
            scores = split_scores(scorer, None, rows, multiple_choice=False)
            report["ratios"][f"{model_name}/{variant}"] = scores["ratios"]
            print(f"{model_name}/{variant}: {time.perf_counter() - started:.0f} s", flush=True)
    reference = report["ratios"]["reference/names"]
    report["summary"] = {
        key: describe(ratios, reference) for key, ratios in report["ratios"].items()
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps({"example": report["example"], "summary": report["summary"]}, indent=2))


if __name__ == "__main__":
    main()
