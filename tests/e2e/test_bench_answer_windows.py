"""bench/answer_windows.py in its smoke form: two TOFU authors registered, their answers (names
taken out) and neighbours' answers streamed through the output guard's windows at two window
sizes. The figures are the benchmark's to show (docs/results/performance.md), not this test's;
this checks that it reads what it says it reads."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from tests.conftest import SHARED_DATA
from tests.e2e.bench_runs import ROOT, run_bench


def test_answer_windows_reads_every_answer_at_each_window_size(tmp_path: Path) -> None:
    if not (SHARED_DATA / "tofu" / "forget10.jsonl").is_file():
        pytest.skip(f"TOFU data not found at {SHARED_DATA}")
    out = tmp_path / "aw.json"
    run_bench(
        "answer_windows.py",
        "--authors", "2", "--neighbours", "40", "--words", "0", "12", "--out", str(out),
        timeout=600,
    )  # fmt: skip
    report = json.loads(out.read_text())
    assert report["authors"] == 2
    for words in ("0", "12"):
        sets = report["by_words"][words]
        assert [sets[k]["n"] for k in ("answers", "answers cut at 60%", "neighbours")] == [
            40,
            40,
            40,
        ]


def test_the_answers_read_name_no_author() -> None:
    """An answer is found only by the classifier, never by its author's name."""
    if not (SHARED_DATA / "tofu" / "forget10.jsonl").is_file():
        pytest.skip(f"TOFU data not found at {SHARED_DATA}")
    sys.path.insert(0, str(ROOT))
    from bench.answer_windows import unnamed
    from bench.classifier_eval import author_names, read_jsonl

    rows = read_jsonl(SHARED_DATA / "tofu" / "forget10.jsonl")
    names = author_names(rows)
    named = [r["answer"] for i, r in enumerate(rows) if names[i // 20].split()[-1] in r["answer"]]
    assert len(named) > 200  # most answers name their author
    for i, row in enumerate(rows):
        text = unnamed(row["answer"], names[i // 20])
        for part in names[i // 20].split():
            if len(part) >= 3:
                assert re.search(rf"\b{re.escape(part)}\b", text) is None, (part, text)
