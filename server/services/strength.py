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

# Perplexity of the corrupted answers under the clean model: the bare model's own answers score
# ~2, fluent corrupted ones 5-9 (SmolLM2); loops are caught by the distinct-token check.
FLUENCY_BOUND = 20.0
MAX_EXAMPLES = 16


class StrengthCalibrator:
    """Holds an HF copy of the served model (loaded on first use) for strength searches."""

    def __init__(self, model_dir: Path, table: EmbeddingTable, device: str = "cpu") -> None:
        self._model_dir = model_dir
        self._table = table
        self._device = device
        self._model: Any = None
        self._tokenizer: Any = None
        self._lock = threading.Lock()

    def default_spec(self) -> CorruptionSpec:
        """The corruption used when no search can run (noise of ~4x the embeddings' std)."""
        return CorruptionSpec.recommended(self._table.std)

    def _load(self) -> tuple[Any, Any]:
        if self._model is None:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer

            logger.info("Loading %s for strength calibration", self._model_dir)
            self._tokenizer = AutoTokenizer.from_pretrained(self._model_dir, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(
                self._model_dir, dtype=torch.float32, local_files_only=True
            )
            self._model = model.to(self._device)  # type: ignore[arg-type]
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
            spec = base or self.default_spec()
            examples = [
                make_forget_example(tokenizer, p, a, spans=find_spans(p, aliases))
                for p, a in zip(prompts, answers, strict=True)
                if a.strip()
            ]
            if len(examples) < 2:
                return spec, {"searched": False, "reason": "fewer than 2 answered examples"}
            result = calibrate_strength(
                model,
                examples[:MAX_EXAMPLES],
                spec,
                StrengthSearchConfig.for_embeddings(std),
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
                "fluent": result.fluency.fluent,
                "distinct_ratio": result.fluency.distinct_ratio,
            }
            return result.spec, report
