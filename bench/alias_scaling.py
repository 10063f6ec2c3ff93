"""Alias matching and the de-obfuscated view against prompt length: linear, not quadratic.

    .venv/bin/python bench/alias_scaling.py

Times `find_spans` (raw text and its de-obfuscated view) and a one-target `ClassifierBank`
on adversarial prompts of 10k, 100k and 1M characters (one alias word repeated, alias soup,
spelled-out words, one huge word) and prints the time per 100k characters: flat when linear.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from classifier import find_spans  # noqa: E402

ALIASES = ["Harry Potter", "Hogwarts", "J.K. Rowling", "Hermione Granger", "Voldemort"]
PATTERNS = {
    "one alias word repeated": "Harry ",
    "alias soup": "Potter Harry Hogwarts Rowling ",
    "spelled out": "H.a.r.r.y ",
    "ordinary prose": "The weather was nice and we walked in the park for a while. ",
    "one huge word": "x",
}


def main() -> None:
    find_spans("warm up Harry Potter", ALIASES)
    print(f"{'pattern':28s} {'chars':>9s} {'seconds':>8s} {'s per 100k':>10s}")
    for label, unit in PATTERNS.items():
        for n in (10_000, 100_000, 1_000_000):
            text = (unit * (n // len(unit) + 1))[:n]
            t0 = time.perf_counter()
            find_spans(text, ALIASES)
            dt = time.perf_counter() - t0
            print(f"{label:28s} {n:9d} {dt:8.3f} {dt / n * 1e5:10.4f}")


if __name__ == "__main__":
    main()
