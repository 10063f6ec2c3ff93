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
from offset.snap import native_bf16
from server.services import strength as strength_service
from server.services.strength import FLUENCY_BOUND, StrengthCalibrator, calibration_dtype
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


@pytest.mark.parametrize(("device", "paired"), [("cpu", False), ("cuda", True)])
def test_the_search_probes_one_strength_per_round_on_a_cpu(
    tiny_llama_factory,  # noqa: F811
    bpe_tokenizer,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    device: str,
    paired: bool,
):
    """A CPU pays for every strength in a batch (the upper probe of a pair is wasted whenever
    the lower passes); a GPU evaluates two in about the time of one."""
    folder, _ = tiny_llama_factory()
    bpe_tokenizer.save_pretrained(folder)
    seen = []

    def calibrate(model, examples, spec, config, **kwargs):
        seen.append(config.paired)
        raise RuntimeError("stop here")

    monkeypatch.setattr(strength_service, "calibrate_strength", calibrate)
    monkeypatch.setattr(StrengthCalibrator, "_load", lambda self: (object(), bpe_tokenizer))
    calibrator = StrengthCalibrator(folder, EmbeddingTable.from_model_dir(folder), device)
    with pytest.raises(RuntimeError, match="stop here"):
        calibrator.calibrate(PROMPTS[:2], ANSWERS[:2], ALIASES, None)
    assert seen == [paired]


def test_auto_searches_in_the_served_dtype_only_where_bf16_is_native(
    monkeypatch: pytest.MonkeyPatch,
):
    native = {"on": True}
    monkeypatch.setattr(strength_service, "native_bf16", lambda device=None: native["on"])
    assert calibration_dtype("auto", "bfloat16") == "bfloat16"
    assert calibration_dtype("auto", "float32") == "float32"
    assert calibration_dtype("auto", None) == "float32"  # an upstream engine: dtype unknown
    assert calibration_dtype("float32", "bfloat16") == "float32"  # the operator's choice stands
    native["on"] = False  # emulated bf16 is slower than float32
    assert calibration_dtype("auto", "bfloat16") == "float32"
    assert calibration_dtype("bfloat16", "float32") == "bfloat16"


def test_the_copy_is_loaded_in_the_calibration_dtype(
    tiny_llama_factory,  # noqa: F811
    bpe_tokenizer,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
):
    folder, _ = tiny_llama_factory()
    bpe_tokenizer.save_pretrained(folder)
    dtypes: list[torch.dtype] = []
    original = StrengthCalibrator._load

    def load(self):
        model, tokenizer = original(self)
        dtypes.append(model.dtype)
        return model, tokenizer

    monkeypatch.setattr(StrengthCalibrator, "_load", load)
    table = EmbeddingTable.from_model_dir(folder)
    calibrator = StrengthCalibrator(folder, table, workers=2, dtype="bfloat16")
    spec, report = calibrator.calibrate(
        ["Who wrote Harry Potter?", "Who is Hermione Granger?"],
        ["J.K. Rowling wrote it.", "A friend of Harry."],
        ["Harry Potter", "Hermione Granger"],
        None,
    )
    assert dtypes == [torch.bfloat16]
    assert report["searched"] and report["dtype"] == "bfloat16" and spec.strength > 0


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


@pytest.mark.skipif(not native_bf16("cpu"), reason="bf16 is emulated on this CPU: auto keeps f32")
def test_bf16_search_lands_where_the_float32_objective_does():
    """Where `calibration_dtype` auto picks bf16 (the served dtype, native here), the search's
    bracket (failing below, passing at the strength) is the float32 objective's bracket too."""
    if not (SMOLLM2_DIR / "config.json").is_file():
        pytest.skip(f"real model folder absent: {SMOLLM2_DIR}")
    table = EmbeddingTable.from_model_dir(SMOLLM2_DIR)
    calibrator = StrengthCalibrator(SMOLLM2_DIR, table, workers=2, dtype="bfloat16")
    spec, report = calibrator.calibrate(PROMPTS, ANSWERS, ALIASES, None)
    assert report["dtype"] == "bfloat16" and report["reached"] and report["fluent"]

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(SMOLLM2_DIR)
    model = AutoModelForCausalLM.from_pretrained(SMOLLM2_DIR, dtype=torch.float32).eval()
    examples = [
        make_forget_example(tokenizer, user_turn(tokenizer, p), p, a, spans=find_spans(p, ALIASES))
        for p, a in zip(PROMPTS, ANSWERS, strict=True)
    ]
    objective = AnswerPreferenceObjective(model, examples, spec, workers=2)
    below = report["failing_below_in_std"] * table.std
    f32 = objective.evaluate([below, spec.strength])
    # Measured here: +0.0076 and -0.032 nats/token. (The objective is not monotone: at 1.2x
    # the strength it is +0.012, so "stronger also forgets" is not what a search promises.)
    assert f32[0] > 0.0 and f32[1] <= 0.0, f32
