"""What the output guard's classifier finds in answers about a target, and what it costs, by
how many words a sentence-end read takes at least (`--guard.output-window-words`).

    .venv/bin/python bench/answer_windows.py [--words 0 8 12 16] [--per-author 5] [--authors 20]

Registers TOFU forget10's first `--authors` fictitious authors (20: all of them) as one person
target each (the name as the alias, `--per-author` of their questions as forget examples), as
a gateway with that many targets holds them. Then streams answers a word a token through the
output guard's windows (`server.services.output_guard.sentence_read`: at each sentence end, the
answer since the last read) and reads each window with the bank, as the guard does:
- recall: each author's 20 TOFU answers with every part of the author's name taken out ("the
  author"), so that only the classifier can find them (the alias scan would find the name).
  An answer counts as found when a window of it flags its author; also the tokens streamed
  before the first flag.
- the same answers cut at 60% of their words, as max_tokens cuts an answer mid-sentence.
- neighbours: retain90's answers (other fictitious authors), names taken out likewise: the
  share that flags any target (a needless restart) and the MiniLM reads per answer.
MiniLM reads are the windows a target's gate sends on to stage 2 (their Decision's stage is
`full`). The data stays in ../shared/data; nothing is copied. Writes
bench/results/answer_windows.json.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.classifier_eval import DATA, author_names, read_jsonl  # noqa: E402
from bench.stream_watch import word_tokens  # noqa: E402
from classifier import ClassifierBank, Embedder, TargetSpec, TrainConfig, train_target  # noqa: E402
from classifier.bank import STAGE_FULL  # noqa: E402
from server.services.output_guard import sentence_read  # noqa: E402


def unnamed(text: str, name: str) -> str:
    """`text` with the author's full name and each part of it (3+ letters) taken out."""
    text = re.sub(re.escape(name) + r"('s)?", "the author", text)
    for part in sorted((p for p in name.split() if len(p) >= 3), key=len, reverse=True):
        text = re.sub(r"\b" + re.escape(part) + r"\b('s)?", "the author", text)
    return text


def stream(bank: ClassifierBank, answer: str, words: int) -> tuple[set[str], int | None, int]:
    """The targets the guard's windows flag in `answer` streamed a word a token, the tokens
    streamed before the first flag (None: none), and the MiniLM reads."""
    tokens = word_tokens(answer)
    text, checked, flagged, first, reads = "", 0, set[str](), None, 0
    for i, token in enumerate(tokens):
        text += token
        window = sentence_read(text, checked, token, i == len(tokens) - 1, words)
        if window is None:
            continue
        checked = len(text)
        if not window.strip():
            continue
        decisions = bank.classify_all([window])
        reads += any(d.stage == STAGE_FULL for d in decisions)
        hit = {d.target for d in decisions if d.flagged}
        if hit and first is None:
            first = i
        flagged |= hit
    return flagged, first, reads


def evaluate(bank: ClassifierBank, cases: dict[str, list[tuple[str, str]]], words: int) -> dict:
    """Per set of (author, answer) cases: found (its author flagged), flagged (any target),
    tokens before the first flag, MiniLM reads an answer."""
    out = {}
    for label, pairs in cases.items():
        found, anyflag, firsts, reads = [], [], [], []
        per_author: dict[str, list[bool]] = {}
        for author, answer in pairs:
            flagged, first, n = stream(bank, answer, words)
            hit = author in flagged
            found.append(hit)
            per_author.setdefault(author, []).append(hit)
            anyflag.append(bool(flagged))
            reads.append(n)
            if first is not None:
                firsts.append(first)
        recalls = [sum(v) / len(v) for v in per_author.values()]
        out[label] = {
            "n": len(pairs),
            "found": sum(found) / len(found),
            "found_min_per_author": min(recalls),
            "flagged_any": sum(anyflag) / len(anyflag),
            "tokens_before_first_flag_mean": statistics.fmean(firsts) if firsts else None,
            "minilm_reads_per_answer": statistics.fmean(reads),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--words", type=int, nargs="+", default=[0, 8, 12, 16])
    parser.add_argument("--authors", type=int, default=20)
    parser.add_argument("--per-author", type=int, default=5)
    parser.add_argument("--neighbours", type=int, default=600, help="retain90 answers read")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/answer_windows.json")
    args = parser.parse_args()
    rows = read_jsonl(DATA / "tofu" / "forget10.jsonl")[: 20 * args.authors]
    names = author_names(rows)
    emb = Embedder()
    t0 = time.perf_counter()
    targets = [
        train_target(
            TargetSpec(
                name, [name], [r["question"] for r in rows[a * 20 : a * 20 + args.per_author]]
            ),
            emb,
            TrainConfig(),
        )
        for a, name in enumerate(names)
    ]
    print(f"{len(targets)} targets trained in {time.perf_counter() - t0:.0f} s")
    bank = ClassifierBank(emb, targets, cache_size=0)
    answers = [(names[i // 20], unnamed(r["answer"], names[i // 20])) for i, r in enumerate(rows)]
    cut = []
    for author, answer in answers:
        tokens = word_tokens(answer)
        cut.append((author, "".join(tokens[: max(1, int(0.6 * len(tokens)))])))
    retain = read_jsonl(DATA / "tofu" / "retain90.jsonl")[: args.neighbours]
    retain_names = author_names(retain[: 20 * (len(retain) // 20)])
    neighbours = [
        ("", unnamed(r["answer"], retain_names[i // 20]))
        for i, r in enumerate(retain[: 20 * len(retain_names)])
    ]
    cases = {"answers": answers, "answers cut at 60%": cut, "neighbours": neighbours}
    report: dict = {"authors": len(names), "per_author": args.per_author, "by_words": {}}
    for words in args.words:
        t0 = time.perf_counter()
        result = evaluate(bank, cases, words)
        report["by_words"][words] = result
        print(f"--- window words {words} ({time.perf_counter() - t0:.0f} s)")
        for label, r in result.items():
            print(
                f"  {label:20} found {r['found']:.3f} (author min {r['found_min_per_author']:.2f})"
                f"  any flag {r['flagged_any']:.3f}  first flag after "
                f"{r['tokens_before_first_flag_mean'] or 0:.1f} tokens  "
                f"MiniLM reads/answer {r['minilm_reads_per_answer']:.2f}"
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
