"""δ's α on a TOFU run: forget quality of delta+npo (scope flagged) at other α, without a rerun.

delta+npo serves logits (1 − α)·target + α·npo (big = small base = the target fine-tune) after
the prompts the guard flags and the target's own after the rest. A committed run measured α = 1;
this scores the forget split's truth ratios again at each `--alphas` value from the cached
models, keeping each question's flag (a flagged question is one whose delta+npo ratio differs
from none's: the offset changed it) and the target's ratios for the rest, and tests them against
the run's reference ratios as `obliviate eval tofu` does (KS, raw and folded).

Choosing α by the forget quality it gives is tuning on the test: the script also reports the
honest form, α chosen on half of the forget authors and scored on the other half (both ways).
Utility and MMLU do not change with α at scope flagged when no utility or MMLU question is
flagged (the run's fp_* columns say so).

    flock /tmp/obliviate-heavy.lock python bench/tofu_alpha.py --alphas 1.25 1.5 1.75 \\
        [--results docs/results/tofu-forget05.json] [--out bench/results/tofu_alpha.json]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluation import metrics  # noqa: E402
from evaluation.measure import split_scores  # noqa: E402
from evaluation.scoring import AnswerScorer, load_model  # noqa: E402
from evaluation.tofu_data import QUESTIONS_PER_AUTHOR, TofuSubset, load_subset  # noqa: E402


def run_subset(run: dict[str, Any]) -> TofuSubset:
    """The TOFU subset a committed `obliviate eval tofu` results file was measured on."""
    cfg = run["config"]
    return load_subset(
        Path(cfg["data_dir"]),
        cfg["forget_split"],
        retain_authors=cfg["retain_authors"],
        retain_eval=cfg["retain_eval"],
        seed=cfg["seed"],
        forget_authors=cfg.get("forget_authors"),
    )


def cached_reference(run: dict[str, Any], target_dir: Path) -> Path:
    """The run's cached reference fine-tune, beside the target's. Found by name, not by the
    runner's cache key: that hashes the base model's file times, which differ between machines."""
    found = sorted(target_dir.parent.glob(f"reference-{run['config']['forget_split']}-*"))
    if len(found) != 1:
        raise SystemExit(f"{len(found)} cached reference fine-tunes beside {target_dir}")
    return found[0]


@dataclass(frozen=True)
class AlphaRun:
    """What the α benches read of a committed `obliviate eval tofu` run: the forget split's
    truth ratios (reference, none, delta+npo at α = 1), which questions the guard flagged
    (δ changed their ratio), the subset, and the δ pair's folders (target fine-tune = small
    base, its SNAP+NPO copy)."""

    run: dict[str, Any]
    reference: list[float]
    none: list[float]
    measured: list[float]
    flagged: list[bool]
    subset: TofuSubset
    target_dir: Path
    npo_dir: Path

    @classmethod
    def load(cls, results: Path) -> AlphaRun:
        run = json.loads(results.read_text())
        ratios = run["forget_truth_ratios"]
        reference, none, measured = ratios["reference"], ratios["none"], ratios["delta+npo"]
        subset = run_subset(run)
        if len(subset.forget) != len(reference):
            raise SystemExit("the results file is not of this subset")
        options = run["cards"]["delta+npo_target"]["options"]
        target_dir, npo_dir = Path(options["small_base"]), Path(options["unlearned_model"])
        if not (npo_dir / "config.json").is_file():  # the job's copy is gone with its gateway
            npo_dir = target_dir.with_name(f"{target_dir.name}-snap-npo")
        flagged = [abs(a - b) > 1e-12 for a, b in zip(none, measured, strict=True)]
        return cls(run, reference, none, measured, flagged, subset, target_dir, npo_dir)


def summary(ratios: list[float], reference: list[float]) -> dict[str, float]:
    return {
        "forget_quality": metrics.forget_quality(ratios, reference),
        "forget_quality_folded": metrics.forget_quality_folded(ratios, reference),
        "prefer_true": sum(r < 1 for r in ratios) / len(ratios),
        "median_log_r": statistics.median(math.log(r) for r in ratios),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--alphas", type=float, nargs="+", required=True)
    parser.add_argument("--results", type=Path, default=Path("docs/results/tofu-forget05.json"))
    parser.add_argument("--out", type=Path, default=Path("bench/results/tofu_alpha.json"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch
    from transformers import AutoTokenizer

    torch.set_num_threads(args.threads)
    ar = AlphaRun.load(args.results)
    subset, target_dir, npo_dir = ar.subset, ar.target_dir, ar.npo_dir
    reference, none, measured, flagged = ar.reference, ar.none, ar.measured, ar.flagged
    tokenizer = AutoTokenizer.from_pretrained(target_dir, local_files_only=True)
    target, npo = load_model(target_dir), load_model(npo_dir)
    rows = [qa for qa, f in zip(subset.forget, flagged, strict=True) if f]

    by_alpha: dict[float, list[float]] = {1.0: list(measured)}
    timings: dict[float, float] = {}
    for alpha in args.alphas:
        started = time.perf_counter()
        terms = [(target, 1.0 - alpha), (npo, alpha)]
        scores = split_scores(AnswerScorer(tokenizer, terms), None, rows, multiple_choice=False)
        fresh = iter(scores["ratios"])
        by_alpha[alpha] = [next(fresh) if f else n for f, n in zip(flagged, none, strict=True)]
        timings[alpha] = time.perf_counter() - started
        print(alpha, summary(by_alpha[alpha], reference), f"{timings[alpha]:.0f} s", flush=True)  # noqa: T201

    # Held out: α chosen on one half of the authors (best forget quality there), scored on the
    # other half.
    half = len(reference) // (2 * QUESTIONS_PER_AUTHOR) * QUESTIONS_PER_AUTHOR
    halves = {"first": slice(0, half), "second": slice(half, len(reference))}
    held_out = {}
    for chosen_on, other in (("first", "second"), ("second", "first")):
        pick, rest = halves[chosen_on], halves[other]
        best = max(
            by_alpha,
            key=lambda a: metrics.forget_quality(by_alpha[a][pick], reference[pick]),
        )
        held_out[f"chosen on the {chosen_on} half"] = {
            "alpha": best,
            "scored_on": other,
            **summary(by_alpha[best][rest], reference[rest]),
        }
    report: dict[str, Any] = {
        "results": str(args.results),
        "target": str(target_dir),
        "npo_copy": str(npo_dir),
        "flagged": sum(flagged),
        "reference": summary(reference, reference) | {"forget_quality": 1.0},
        "none": summary(none, reference),
        "alphas": {str(a): summary(r, reference) for a, r in sorted(by_alpha.items())},
        "held_out": held_out,
        "seconds": {str(a): t for a, t in timings.items()},
        "ratios": {str(a): r for a, r in sorted(by_alpha.items())},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k != "ratios"}, indent=1))  # noqa: T201


if __name__ == "__main__":
    main()
