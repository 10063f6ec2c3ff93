"""Per-target corruption strength, searched offline against a local copy of the served model.

The objective and its stopping level are written down in `corruption.strength`: the model's
per-token likelihood of the target's known answers (given, or the bare model's own greedy answers)
must fall to the level of unrelated answers, and the answers generated from the corrupted prompts
must stay fluent (perplexity bound). The weakest strength that gets there is stored.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from classifier import find_spans
from corruption import (
    CorruptionSpec,
    EmbeddingTable,
    StrengthSearchConfig,
    calibrate_strength,
    make_forget_example,
)

logger = logging.getLogger(__name__)

# Strengths are searched in units of the embedding table's std (SmolLM2: noise of 1x std already
# changes answers, 3x on the whole prompt gives garbage; only the target's name tokens are hit).
DEFAULT_METHOD = "add_noise_first_n"
INITIAL_STD, EPS_STD, LR_STD, MAX_STD = 0.5, 0.25, 2.0, 6.0
FLUENCY_BOUND = 200.0


class StrengthCalibrator:
    """Holds an HF copy of the served model (loaded on first use) for strength searches."""

    def __init__(self, model_dir: Path, table: EmbeddingTable, device: str = "cpu") -> None:
        self._model_dir = model_dir
        self._table = table
        self._device = device
        self._model: Any = None
        self._tokenizer: Any = None
        self._lock = threading.Lock()

    @staticmethod
    def default_spec(std: float = 1.0) -> CorruptionSpec:
        """The corruption used when no search can run."""
        return CorruptionSpec(DEFAULT_METHOD, strength=3.0 * std, dims=None, seed=0)

    def _load(self) -> tuple[Any, Any]:
        if self._model is None:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer

            logger.info("Loading %s for strength calibration", self._model_dir)
            self._tokenizer = AutoTokenizer.from_pretrained(self._model_dir, local_files_only=True)
            self._model = AutoModelForCausalLM.from_pretrained(
                self._model_dir, dtype=torch.float32, local_files_only=True
            ).to(self._device)
            self._model.eval()
        return self._model, self._tokenizer

    def calibrate(
        self,
        prompts: list[str],
        answers: list[str],
        aliases: list[str],
        base: CorruptionSpec | None,
    ) -> tuple[CorruptionSpec, dict[str, Any]]:
        """Search the weakest strength that forgets; returns the spec and a report."""
        with self._lock:
            model, tokenizer = self._load()
            std = self._table.std
            spec = base or CorruptionSpec(DEFAULT_METHOD, strength=INITIAL_STD * std)
            examples = [
                make_forget_example(tokenizer, p, a, spans=find_spans(p, aliases))
                for p, a in zip(prompts, answers, strict=True)
                if a.strip()
            ]
            if len(examples) < 2:
                return spec.with_strength(3.0 * std), {
                    "searched": False,
                    "reason": "too few answers",
                }
            config = StrengthSearchConfig(
                initial=INITIAL_STD * std,
                lr=LR_STD * std,
                eps=EPS_STD * std,
                min_strength=EPS_STD * std,
                max_strength=MAX_STD * std,
                max_steps=8,
            )
            result = calibrate_strength(
                model,
                examples[:16],
                spec,
                config,
                fluency_bound=FLUENCY_BOUND,
                eos_token_id=tokenizer.eos_token_id,
            )
            report = {
                "searched": True,
                "strength_in_std": result.spec.strength / std,
                "objective": result.search.value,
                "reached": result.search.reached,
                "evaluations": result.search.evaluations,
                "seconds": result.search.seconds,
                "fluency_perplexity": result.fluency.perplexity,
                "fluent": getattr(result.fluency, "passed", None),
            }
            return result.spec, report
