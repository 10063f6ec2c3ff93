"""The `obliviate eval tofu` command (declared in obliviate/cli.py, implemented here)."""

from __future__ import annotations

import logging
import shlex
import sys
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict


class TofuCommand(BaseModel):
    """Run the TOFU protocol (fine-tunes, gateway, every mode) and write docs/results/."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    forget: str = "forget01"
    """Forget split: forget01, forget05 or forget10."""
    modes: str = "none,prompt,eco,delta,snap,reference"
    """Comma-separated modes: none, prompt, eco, delta, snap, snap+npo, delta+npo (δ with the
    snap+npo copy at scope flagged), reference."""
    data_dir: Path | None = None
    """Folder holding tofu/ and mmlu/ as JSON Lines (e.g. ../shared/data); default: the
    Hugging Face datasets locuslab/TOFU and cais/mmlu, cached under the cache folder."""
    model: str | None = None
    """Base model folder or cached name; default: SmolLM2-135M-Instruct."""
    out_dir: Path = Path("docs/results")
    """Where the table, JSON and plot go."""
    cache_dir: Path | None = None
    """Fine-tuned models cache; default: <user cache>/obliviate/eval."""
    retain_authors: int = 2
    """Retain authors sampled into both fine-tunes."""
    retain_eval: int = 15
    """retain_perturbed questions in the utility measure."""
    mmlu_questions: int = 100
    """MMLU val questions (seeded sample)."""
    epochs: int = 4
    """Fine-tuning epochs."""
    lr: float = 2e-4
    """Fine-tuning learning rate."""
    max_steps: int | None = None
    """Cap on fine-tuning steps (smoke runs)."""
    snap_max_steps: int | None = None
    """Cap on SNAP steps (smoke runs)."""
    forget_authors: int | None = None
    """Use only the first N forget authors (smoke runs)."""
    utility_questions: int | None = 25
    """Use the first N real_authors and world_facts questions (None: all 100 / 117)."""
    max_tokens: int = 64
    """Longest generated answer."""
    alpha: float = 1.0
    """δ strength."""
    seed: int = 0
    eco_scoring: Literal["transformers", "gateway"] = "transformers"
    """Score eco answers with transformers (question flagged, prompt corrupted) or through the
    gateway's own prompt logprobs (the guard also reads and corrupts the answer)."""

    def cli_cmd(self) -> None:
        from evaluation.finetune import FinetuneConfig
        from evaluation.runner import TofuEvalConfig, default_eval_cache, run_tofu
        from server.modelstore import resolve_model

        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True
        )
        logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
        from evaluation.sources import DataUnavailable, open_source

        cache_dir = self.cache_dir or default_eval_cache()
        try:  # fail before any fine-tune when the data cannot be read
            open_source(self.data_dir, cache_dir).tofu("full")
        except DataUnavailable as exc:
            raise SystemExit(str(exc)) from exc
        config = TofuEvalConfig(
            data_dir=self.data_dir,
            base_model=resolve_model(self.model, None, auto_pull=True),
            forget_split=self.forget,
            modes=tuple(m.strip() for m in self.modes.split(",") if m.strip()),
            retain_authors=self.retain_authors,
            retain_eval=self.retain_eval,
            mmlu_questions=self.mmlu_questions,
            seed=self.seed,
            max_tokens=self.max_tokens,
            alpha=self.alpha,
            finetune=FinetuneConfig(
                epochs=self.epochs, lr=self.lr, max_steps=self.max_steps, seed=self.seed
            ),
            snap_max_steps=self.snap_max_steps,
            forget_authors=self.forget_authors,
            utility_questions=self.utility_questions,
            eco_scoring=self.eco_scoring,
            cache_dir=cache_dir,
            out_dir=self.out_dir,
            command="obliviate " + shlex.join(sys.argv[1:]) if sys.argv[1:2] == ["eval"] else "",
        )
        data = run_tofu(config)
        sys.stdout.write(f"{self.out_dir}/tofu-{self.forget}.md ({len(data['rows'])} modes)\n")
