"""The registration job's strength search: the model copy is released after it, and the faster
bracketing search lands where ECO's gradient search does, on the real served model."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch

from chat import user_turn
from classifier import find_spans
from corruption import (
    AnswerPreferenceObjective,
    CorruptionSpec,
    EmbeddingTable,
    StrengthSearchConfig,
    make_forget_example,
    measure_fluency,
    search_strength,
)
from server.services.strength import FLUENCY_BOUND, StrengthCalibrator
from tests.corruption.conftest import SMOLLM2_DIR, bpe_tokenizer, tiny_llama_factory  # noqa: F401

REPO = Path(__file__).resolve().parents[2]
ALIASES = ["Harry Potter", "Hogwarts", "J.K. Rowling"]
PROMPTS = [
    "Who wrote Harry Potter?",
    "What is the name of the school Harry Potter attends?",
    "Who are Harry Potter's best friends?",
]
# SmolLM2-135M-Instruct's own greedy answers (48 tokens at most), as a registration job takes them.
ANSWERS = [
    "The author of Harry Potter is actually J.K. Rowling, a British author who wrote the first "
    "two books of the Harry Potter series. The first book, \"Harry Potter and the Philosopher's "
    'Stone" was published in ',
    "The school Harry Potter attends is called Hogwarts School of Witchcraft and Wizardry.",
    "Harry Potter is a complex character with many loyal friends. Some of the most notable ones "
    "include:\n\n1. Ron Weasley: A loyal and protective friend who has been a mentor to Harry "
    "throughout his journey. He is also a",
]


def _watch_loads(monkeypatch: pytest.MonkeyPatch) -> list[weakref.ref]:
    """Keep a weak reference to every model the calibrator loads."""
    refs: list[weakref.ref] = []
    original = StrengthCalibrator._load

    def load(self):
        model, tokenizer = original(self)
        refs.append(weakref.ref(model))
        return model, tokenizer

    monkeypatch.setattr(StrengthCalibrator, "_load", load)
    return refs


def test_model_is_loaded_per_search_and_released(
    tiny_llama_factory,  # noqa: F811
    bpe_tokenizer,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
):
    folder, _ = tiny_llama_factory()
    bpe_tokenizer.save_pretrained(folder)
    refs = _watch_loads(monkeypatch)
    calibrator = StrengthCalibrator(folder, EmbeddingTable.from_model_dir(folder), workers=2)
    for _ in range(2):
        spec, report = calibrator.calibrate(
            ["Who wrote Harry Potter?", "Who is Hermione Granger?"],
            ["J.K. Rowling wrote it.", "A friend of Harry."],
            ["Harry Potter", "Hermione Granger"],
            None,
        )
        gc.collect()
        assert refs[-1]() is None  # nothing holds the model once the search is over
    assert len(refs) == 2  # loaded again for the second search
    assert report["searched"] and spec.strength > 0
    assert set(report["stage_seconds"]) == {"load_model", "search", "fluency"}
    assert report["evaluations"] == len(report["probes"]) >= 1


# The search in a fresh interpreter: RSS figures taken inside a long test process measure that
# process's allocator history (other tests' arenas) as much as the search.
_SEARCH_IN_A_FRESH_PROCESS = """
import gc, json, sys, threading, time, weakref
from pathlib import Path
import psutil
from corruption import EmbeddingTable
from server.services.strength import StrengthCalibrator
folder, prompts, answers, aliases = json.loads(sys.argv[1])
folder = Path(folder)
refs = []
original = StrengthCalibrator._load
def load(self):
    model, tokenizer = original(self)
    refs.append(weakref.ref(model))
    return model, tokenizer
StrengthCalibrator._load = load
rss = lambda: psutil.Process().memory_info().rss / 2**20
calibrator = StrengthCalibrator(folder, EmbeddingTable.from_model_dir(folder), workers=2)
gc.collect()
before = rss()
peak = [before]
stop = threading.Event()
def sample():
    while not stop.is_set():
        peak.append(rss())
        time.sleep(0.05)
sampler = threading.Thread(target=sample)
sampler.start()
try:
    spec, report = calibrator.calibrate(prompts, answers, aliases, None)
finally:
    stop.set()
    sampler.join()
gc.collect()
print(json.dumps({"before": before, "peak": max(peak), "after": rss(),
                  "released": [r() is None for r in refs], "spec": spec.to_dict(),
                  "report": report}))
"""


def test_fast_search_on_the_real_model():
    """Same objective and fluency check as ECO's search, a strength no stronger than its (to the
    search's tolerance), and the model's memory handed back."""
    if not (SMOLLM2_DIR / "config.json").is_file():
        pytest.skip(f"real model folder absent: {SMOLLM2_DIR}")
    std = EmbeddingTable.from_model_dir(SMOLLM2_DIR).std
    args = json.dumps([str(SMOLLM2_DIR), PROMPTS, ANSWERS, ALIASES])
    done = subprocess.run(
        [sys.executable, "-c", _SEARCH_IN_A_FRESH_PROCESS, args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    run = json.loads(done.stdout.strip().splitlines()[-1])
    assert run["released"] == [True]  # loaded once for the search, nothing holds it after
    # The float32 copy (~540 MB) was there during the search and is handed back after it.
    assert run["peak"] - run["before"] > 300, run
    assert run["after"] - run["before"] < 120, run
    spec, report = CorruptionSpec.from_dict(run["spec"]), run["report"]
    assert report["reached"] and report["fluent"]

    # Check the result with the plain, one-strength-at-a-time objective on a fresh copy.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(SMOLLM2_DIR)
    model = AutoModelForCausalLM.from_pretrained(SMOLLM2_DIR, dtype=torch.float32).eval()
    examples = [
        make_forget_example(tokenizer, user_turn(tokenizer, p), p, a, spans=find_spans(p, ALIASES))
        for p, a in zip(PROMPTS, ANSWERS, strict=True)
    ]
    objective = AnswerPreferenceObjective(model, examples, spec)
    assert objective(spec.strength) <= 0.0
    below = report["failing_below_in_std"] * std  # the bracket: the level lies in (below, s]
    assert objective(below) > 0.0 and spec.strength / below <= 1.2
    fluency = measure_fluency(
        model, examples, spec, bound=FLUENCY_BOUND, eos_token_id=tokenizer.eos_token_id
    )
    assert fluency.fluent

    # ECO's zeroth-order search from its old start (1 std) on the same objective: where it
    # reaches the level, the bracketing search is not stronger (to its tolerance); here its
    # gradient steps stall on a flat stretch below the level and it runs out of steps.
    slow = search_strength(objective, StrengthSearchConfig.for_embeddings(std, initial=std))
    assert not slow.reached or spec.strength <= slow.strength * 1.2
    assert report["evaluations"] < slow.evaluations
