"""The registration's α search (`offset.alpha`, option `alpha: "auto"`) replayed on TOFU forget05.

The product's own code chooses δ's α from what an operator can give it: a handful of questions
about the target with their answer and wrong answers, and probes (questions about entities the
served model never saw, written the same way). Here the target is forget05's authors, the
probes are forget10's authors that neither fine-tune saw (`bench/tofu_alpha_unseen.py`), the
pair is the run's target fine-tune (small base = served model) and its SNAP+NPO copy. The
reference model is read only afterwards: the forget quality (KS p against the reference's
ratios, all 200 questions, δ at scope `flagged` as the run served it) of each chosen α.

Choices are made (by the product's rule, and, to compare, by the α whose median log R is nearest
the level's)
  - from all 200 questions and all 200 probes (the rule at full size);
  - from operator-sized samples: `--examples` questions about the target and `--probes` probes
    (each size against each), drawn `--draws` times (seeded): what a registration sees.

    flock /tmp/obliviate-heavy.lock python bench/tofu_alpha_auto.py \\
        [--results docs/results/tofu-forget05.json] [--examples 5 10 20 50 100] \\
        [--probes 10 20 50] [--draws 200] [--reuse an-earlier-out.json]
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.tofu_alpha import AlphaRun  # noqa: E402
from bench.tofu_alpha_unseen import unseen_rows  # noqa: E402
from evaluation import metrics  # noqa: E402
from evaluation.scoring import load_model  # noqa: E402
from evaluation.tofu_data import QA  # noqa: E402
from offset.alpha import ALPHAS, AlphaChoice, RatioItem, choose_alpha, truth_ratios  # noqa: E402
from server.services.offsets import ratio_items  # noqa: E402


def items_of(tokenizer: Any, rows: list[QA]) -> list[RatioItem]:
    """TOFU rows as the registration scores forget examples: the (paraphrased) answer, the
    perturbed answers as the wrong ones."""
    return ratio_items(
        tokenizer,
        [(qa.question, qa.paraphrased_answer or qa.answer, qa.perturbed_answers) for qa in rows],
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--results", type=Path, default=Path("docs/results/tofu-forget05.json"))
    parser.add_argument("--examples", type=int, nargs="+", default=[5, 10, 20, 50, 100])
    parser.add_argument("--probes", type=int, nargs="+", default=[10, 20, 50])
    parser.add_argument("--draws", type=int, default=200)
    parser.add_argument("--coverage-draws", type=int, default=100)
    parser.add_argument("--reuse", type=Path, help="take the ratios from an earlier --out")
    parser.add_argument("--out", type=Path, default=Path("bench/results/tofu_alpha_auto.json"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch
    from transformers import AutoTokenizer

    torch.set_num_threads(args.threads)
    ar = AlphaRun.load(args.results)
    run, subset, target_dir, npo_dir = ar.run, ar.subset, ar.target_dir, ar.npo_dir
    reference, none, measured, flagged = ar.reference, ar.none, ar.measured, ar.flagged
    tokenizer = AutoTokenizer.from_pretrained(target_dir, local_files_only=True)
    base, unlearned = load_model(target_dir), load_model(npo_dir)

    probe_rows, unseen_authors = unseen_rows(run)
    if args.reuse is not None:  # the ratios of an earlier run of this bench
        earlier = json.loads(args.reuse.read_text())
        level_all = earlier["ratios"]["level"]
        by_alpha = {float(a): r for a, r in earlier["ratios"]["by_alpha"].items()}
        level_seconds, sweep_seconds = earlier["seconds"]["level"], earlier["seconds"]["sweep"]
    else:
        started = time.perf_counter()
        level_all = truth_ratios(None, base, items_of(tokenizer, probe_rows), [0.0])[0.0]
        level_seconds = time.perf_counter() - started
        started = time.perf_counter()
        by_alpha = truth_ratios(unlearned, base, items_of(tokenizer, list(subset.forget)), ALPHAS)
        sweep_seconds = time.perf_counter() - started
    print(f"level {level_seconds:.0f} s, sweep {sweep_seconds:.0f} s", flush=True)  # noqa: T201

    # Served at scope `flagged`: unflagged questions keep the target's own ratio.
    served = {
        a: [r if f else n for r, f, n in zip(rs, flagged, none, strict=True)]
        for a, rs in by_alpha.items()
    }
    fq = {a: metrics.forget_quality(rs, reference) for a, rs in served.items()}
    check = max(
        abs(x - y) / y
        for a in (1.0, 1.5)
        for x, y, f in zip(served[a], run_alpha(args.results, a, measured), flagged, strict=True)
        if f
    )
    full = choose_alpha(level_all, by_alpha)

    def draw(
        rng: random.Random, n_examples: int, n_probes: int, resamples: int = 200
    ) -> AlphaChoice:
        """The choice from a random handful of examples and probes, as a registration sees."""
        examples = rng.sample(range(len(by_alpha[1.0])), n_examples)
        probes = rng.sample(range(len(level_all)), n_probes)
        return choose_alpha(
            [level_all[i] for i in probes],
            {a: [rs[i] for i in examples] for a, rs in by_alpha.items()},
            resamples=resamples,
        )

    samples = {}
    for n_examples in args.examples:
        for n_probes in args.probes:
            rng = random.Random(0)
            picks: dict[str, list[float]] = {"ks": [], "median": []}
            for _ in range(args.draws):
                choice = draw(rng, n_examples, n_probes, resamples=0)
                picks["ks"].append(choice.alpha)
                picks["median"].append(nearest_median(choice))
            samples[f"{n_examples} examples, {n_probes} probes"] = {
                rule: describe(chosen, fq) for rule, chosen in picks.items()
            }
    # Does the record's 80% interval tell the operator when the choice is uncertain? Share of
    # draws whose interval holds the full-size choice, and its width.
    coverage = {}
    for n_examples, n_probes in ((10, 20), (20, 20), (50, 50)):
        rng = random.Random(1)
        held, widths = 0, []
        for _ in range(args.coverage_draws):
            choice = draw(rng, n_examples, n_probes)
            assert choice.interval is not None
            low, high = choice.interval
            held += low <= full.alpha <= high
            widths.append(high - low)
        coverage[f"{n_examples} examples, {n_probes} probes"] = {
            "interval_holds_the_full_size_choice": held / args.coverage_draws,
            "median_width": statistics.median(widths),
        }
    report = {
        "results": str(args.results),
        "pair": {"base": str(target_dir), "unlearned": str(npo_dir)},
        "probes": {"authors": unseen_authors, "questions": len(probe_rows)},
        "max_relative_difference_from_the_alpha_bench": check,
        "forget_quality_by_alpha": {str(a): v for a, v in fq.items()},
        "best_alpha_against_the_reference": max(fq, key=lambda a: fq[a]),
        "full": {**full.report(), "forget_quality": fq[full.alpha]},
        "forget_quality_at_alpha_1": fq[1.0],
        "samples": {"draws": args.draws, **samples},
        "interval_80": {"draws": args.coverage_draws, **coverage},
        "seconds": {"level": level_seconds, "sweep": sweep_seconds},
        "ratios": {"level": level_all, "by_alpha": {str(a): r for a, r in by_alpha.items()}},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k != "ratios"}, indent=1))  # noqa: T201


def nearest_median(choice: AlphaChoice) -> float:
    """The other rule compared: the α whose median log R is nearest the level's."""
    rows = choice.by_alpha
    return min(rows, key=lambda a: (abs(rows[a]["median_log_r"] - choice.level_median_log_r), a))


def describe(picks: list[float], fq: dict[float, float]) -> dict[str, Any]:
    counts = collections.Counter(picks)
    return {
        "chosen": {str(a): counts[a] for a in sorted(counts)},
        "median_forget_quality": statistics.median(fq[a] for a in picks),
        "share_at_or_above_0.05": sum(fq[a] >= 0.05 for a in picks) / len(picks),
    }


def run_alpha(results: Path, alpha: float, measured: list[float]) -> list[float]:
    """The same α's ratios as bench/tofu_alpha.py measured them (α = 1: the eval run's)."""
    if alpha == 1.0:
        return measured
    stored = json.loads(results.with_name("tofu-forget05-alpha.json").read_text())["ratios"]
    return list(stored[str(alpha)])


if __name__ == "__main__":
    main()
