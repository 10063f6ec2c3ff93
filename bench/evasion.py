"""Recall of the prompt classifier on obfuscated forget prompts, per kind of obfuscation.

    .venv/bin/python bench/evasion.py [--fpr 0.01]

Trains the Harry Potter target of bench/classifier_eval.py, then classifies each prompt of
bench/data/evasion_harry_potter.json (plain, leetspeak, spaced/punctuated, homoglyphs, case,
misspellings, French, German, Spanish, indirect references) with and without the normalised
view (classifier/normalize.py), plus obfuscated harmless prompts (false positives). Prints a
table and writes bench/results/evasion.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from classifier_eval import HP_ALIASES, HP_EXAMPLES  # noqa: E402

from classifier import ClassifierBank, Embedder, TargetSpec, TrainConfig, train_target  # noqa: E402

DATA = ROOT / "bench" / "data" / "evasion_harry_potter.json"
STRONG_KINDS = ("plain", "leetspeak", "spaced_punctuated", "homoglyph", "case", "misspelling")


def load_cases(path: Path = DATA) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def train_bank(embedder: Embedder, fpr: float = 0.01, seed: int = 0) -> ClassifierBank:
    spec = TargetSpec("harry-potter", HP_ALIASES, HP_EXAMPLES)
    target = train_target(spec, embedder, TrainConfig(fpr=fpr, seed=seed))
    return ClassifierBank(embedder, [target])


def _flagged(bank: ClassifierBank, prompts: list[str], normalized: bool) -> list[bool]:
    return [any(d.flagged for d in ds) for ds in bank.classify(prompts, normalized=normalized)]


def evaluate(bank: ClassifierBank, cases: dict[str, Any]) -> dict[str, Any]:
    """Per kind: n, recall with the normalised view and without; FPs on harmless prompts."""
    kinds: dict[str, Any] = {}
    for kind, prompts in cases["kinds"].items():
        with_view = _flagged(bank, prompts, True)
        raw = _flagged(bank, prompts, False)
        kinds[kind] = {
            "n": len(prompts),
            "recall": sum(with_view) / len(prompts),
            "recall_without_normalisation": sum(raw) / len(prompts),
            "missed": [p for p, f in zip(prompts, with_view, strict=True) if not f],
        }
    benign = cases["benign_obfuscated"]
    fp = _flagged(bank, benign, True)
    start = time.perf_counter()
    for p in cases["kinds"]["plain"] + benign:
        bank.classify([p])
    timed = len(cases["kinds"]["plain"]) + len(benign)
    per_prompt_ms = (time.perf_counter() - start) * 1000 / timed
    weak = [k for k, v in kinds.items() if v["recall"] < 0.75]
    return {
        "target": cases["target"],
        "kinds": kinds,
        "weak_kinds": weak,
        "benign_obfuscated": {
            "n": len(benign),
            "false_positives": sum(fp),
            "flagged": [p for p, f in zip(benign, fp, strict=True) if f],
        },
        "classify_ms_per_prompt": round(per_prompt_ms, 2),
    }


def table(report: dict[str, Any]) -> str:
    lines = ["| kind | n | recall | without normalisation |", "|---|---|---|---|"]
    for kind, v in report["kinds"].items():
        lines.append(
            f"| {kind} | {v['n']} | {v['recall']:.2f} | {v['recall_without_normalisation']:.2f} |"
        )
    b = report["benign_obfuscated"]
    fp = f"{b['false_positives']}/{b['n']}"
    lines.append(f"\nfalse positives on obfuscated harmless prompts: {fp}")
    lines.append(f"weak kinds (recall < 0.75): {', '.join(report['weak_kinds']) or 'none'}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fpr", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "evasion.json")
    args = parser.parse_args()
    embedder = Embedder()
    started = time.perf_counter()
    bank = train_bank(embedder, args.fpr, args.seed)
    report = evaluate(bank, load_cases())
    report["train_s"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    print(table(report))


if __name__ == "__main__":
    main()
