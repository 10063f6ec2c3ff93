"""One evaluation run's settings and state (shared by the runner and the report)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import platformdirs

from evaluation.finetune import FinetuneConfig
from evaluation.measure import ModeResult
from evaluation.modes import MODES
from evaluation.tofu_data import MmluQuestion, TofuSubset


def default_eval_cache() -> Path:
    """Where fine-tuned and SNAP models are kept between runs (user cache dir)."""
    return Path(platformdirs.user_cache_dir("obliviate")) / "eval"


@dataclass(frozen=True)
class TofuEvalConfig:
    """One evaluation run; the defaults are the committed forget01 setting."""

    data_dir: Path | None
    """Local JSON Lines copies of TOFU and MMLU; None: the Hugging Face hub (cached)."""
    base_model: Path
    forget_split: str = "forget01"
    modes: tuple[str, ...] = MODES
    retain_authors: int = 2
    """Retain authors sampled into both fine-tunes (seeded)."""
    retain_eval: int = 15
    """retain_perturbed questions (of the sampled authors) in the utility measure."""
    mmlu_questions: int = 100
    seed: int = 0
    max_tokens: int = 64
    alpha: float = 1.0
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    snap_max_steps: int | None = None
    forget_authors: int | None = None
    """Use only the first N forget authors (smoke runs)."""
    utility_questions: int | None = 25
    """Use the first N real_authors and world_facts questions (None: all 100 / 117)."""
    cache_dir: Path = field(default_factory=default_eval_cache)
    out_dir: Path = Path("docs/results")
    dtype: str = "float32"
    """Engine dtype (float32 matches the transformers scoring; bf16 is emulated on some CPUs)."""
    command: str = ""
    torch_threads: int = 1
    """Torch threads of this process; one avoids OpenMP threads waiting on each other when the
    CPU is shared (the engine runs in its own process)."""
    finetune_threads: int | None = None
    """Torch threads for the two fine-tunes, which run alone before anything else; None: every
    core (measured here: 2 threads 80-93 tokens/s against 44-71 for one)."""
    eco_scoring: str = "transformers"
    """How eco answers are scored: `transformers` (the flag decided on the question, only the
    prompt corrupted, recomputed here) or `gateway` (through the gateway's own prompt logprobs:
    the guard reads the answer too and corrupts its target mentions, the ECO paper's protocol)."""


@dataclass
class RunState:
    config: TofuEvalConfig
    subset: TofuSubset
    mmlu: list[MmluQuestion]
    workdir: Path
    target_dir: Path
    reference_dir: Path
    results: dict[str, ModeResult] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    cards: dict[str, Any] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    earlier_commands: list[dict[str, Any]] = field(default_factory=list)
    scores: dict[tuple[str, str, str], float] = field(default_factory=dict)
    """Answer log-probs shared by modes that send the same prompt to the same weights."""


def config_card(config: TofuEvalConfig) -> dict[str, Any]:
    """The config as JSON-friendly values."""
    card = asdict(config)
    return json.loads(json.dumps(card, default=str))  # type: ignore[no-any-return]
