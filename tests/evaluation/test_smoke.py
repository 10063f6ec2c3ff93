"""The whole `obliviate eval tofu` pipeline on two authors and a few steps (real vLLM gateway).

Efficacy is shown by the committed results (docs/results/), not here: this checks that the
pipeline runs end to end and writes a consistent report.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from evaluation.finetune import FinetuneConfig
from evaluation.runner import TofuEvalConfig, prepare, run_tofu

pytestmark = pytest.mark.e2e


def test_pipeline_on_two_authors(tofu_data: Path, chat_tokenizer_dir: Path, tmp_path: Path) -> None:
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed: run `make test`, which installs it")
    config = TofuEvalConfig(
        data_dir=tofu_data,
        base_model=chat_tokenizer_dir,
        modes=("none", "eco", "prompt", "reference"),
        forget_authors=1,
        retain_authors=1,
        retain_eval=2,
        utility_questions=2,
        mmlu_questions=3,
        max_tokens=8,
        finetune=FinetuneConfig(epochs=1, max_steps=2),
        cache_dir=tmp_path / "cache",
        out_dir=tmp_path / "results",
        command="smoke",
    )
    data = run_tofu(config)
    assert set(data["rows"]) == {"none", "eco", "prompt", "reference"}, data["failures"]
    assert data["subset"]["forget_eval"] == 20 and len(data["subset"]["retain_authors"]) == 1
    for row in data["rows"].values():
        for key in ("forget_rouge", "forget_prob", "model_utility", "mmlu_accuracy"):
            assert 0.0 <= row[key] <= 1.0, key
    # Against itself the reference's truth ratios are one sample: KS p-value 1.
    assert data["rows"]["reference"]["forget_quality"] == pytest.approx(1.0)
    assert data["rows"]["reference"]["forget_quality_folded"] == pytest.approx(1.0)
    # eco is scored under both protocols: (b) through the gateway, which also reads the answer
    # and corrupts the author's name where the answer repeats it, so the gold answer is less
    # predictable than under (a), where only the question is corrupted.
    eco = data["rows"]["eco"]
    assert len(data["gateway_truth_ratios"]["eco"]) == len(data["forget_truth_ratios"]["eco"])
    assert eco["flagged_forget"] >= 0.95, eco
    assert eco["forget_prob_b"] < eco["forget_prob"], eco
    assert eco["forget_quality_b"] is not None and eco["forget_quality_b_folded"] is not None
    text = (tmp_path / "results" / "tofu-forget01.md").read_text()
    assert "| none |" in text and "| reference |" in text
    assert (tmp_path / "results" / "tofu-forget01.png").is_file()
    # A rerun reuses both fine-tunes from the cache.
    again = prepare(config)
    assert again.cards["target_finetune"]["cached"]
    assert again.cards["reference_finetune"]["cached"]
    # A run of some modes keeps the other modes' rows of the same setting.
    assert json.loads((tmp_path / "results" / "tofu-forget01.json").read_text())["run_key"]
